//! The byte budget of the consume connection (`amqp.max_held_bytes`): the
//! socket is not read while the deliveries held add up to the budget, so
//! TCP backpressure stops the broker (docs/design.md, "The byte budget").
//!
//! Why at the socket: the prefetch count bounds deliveries, not bytes; a
//! channel-global prefetch could be lowered on the fly on a classic queue,
//! but a quorum queue refuses it, a consumer's own prefetch is fixed when it
//! registers, and lapin reads whatever the broker sends into an unbounded
//! buffer. Not reading is the one brake that works for every queue type.
//!
//! What counts: the bodies the session holds ([`HeldBody`], released when
//! the last copy is dropped: acknowledged, or its dead-letter copy
//! confirmed) plus the bytes read from the socket since the session last
//! found lapin's delivery buffer empty ("unclaimed": deliveries lapin holds
//! that the session has not taken yet). A delivery whose body is still
//! arriving when the buffer is found empty is counted once it is taken, so
//! the bound is the budget plus one delivery plus lapin's read buffer.
//!
//! Not reading also holds back the broker's answers on that connection,
//! among them the lease round trips (`crate::fence`): see [`reads_allowed`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::Reactor;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::task::AtomicWaker;
use futures_util::Stream;

/// Whether the socket may be read: while what is held and unclaimed stays
/// under the budget, or when the lease needs an answer (`lease_yield`).
///
/// The lease exception: held bodies that can only be freed by requests to
/// the API (valid updates) cannot be freed while the lease has lapsed, and
/// the lease cannot be renewed while its answer waits behind unread
/// deliveries. Rather than stall for good, the socket is read on until the
/// answer comes; the watcher decides when (`session::watch::lease_yield`):
/// dead-letter copies free their bytes without the lease, so while they
/// do, it waits for them, but never for long (a resource alarm may block
/// them, and lapin closes a connection it cannot read for two heartbeats).
pub(crate) fn reads_allowed(held: u64, unclaimed: u64, budget: u64, lease_yield: bool) -> bool {
    lease_yield || held.saturating_add(unclaimed) < budget
}

/// The gate of one connection, shared by its socket, the session and the watcher.
#[derive(Debug)]
pub(crate) struct ReadGate {
    budget: u64,
    /// Bytes of the bodies the session holds.
    held: AtomicU64,
    /// Bytes read from the socket so far.
    read: AtomicU64,
    /// `read` when the session last found lapin's delivery buffer empty.
    claimed: AtomicU64,
    /// Read on regardless of the budget: the lease needs an answer.
    lease_yield: AtomicBool,
    /// Dead-letter copies being published (their bytes free without the lease).
    dead_letters: AtomicUsize,
    /// When the socket was last read, in milliseconds since `born`.
    last_read_ms: AtomicU64,
    /// Set when the session has ended: the socket is read from then on, so
    /// that the close handshake (and whatever precedes it) can be read.
    ended: AtomicBool,
    born: Instant,
    waker: AtomicWaker,
}

impl ReadGate {
    /// A gate for `budget` bytes.
    pub(crate) fn new(budget: u64) -> Arc<ReadGate> {
        Arc::new(ReadGate {
            budget,
            held: AtomicU64::new(0),
            read: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            lease_yield: AtomicBool::new(false),
            dead_letters: AtomicUsize::new(0),
            last_read_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            born: Instant::now(),
            waker: AtomicWaker::new(),
        })
    }

    /// Whether the socket may be read now.
    pub(crate) fn allowed(&self) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return true;
        }
        let read = self.read.load(Ordering::Acquire);
        let claimed = self.claimed.load(Ordering::Acquire);
        reads_allowed(
            self.held.load(Ordering::Acquire),
            read.saturating_sub(claimed),
            self.budget,
            self.lease_yield.load(Ordering::Acquire),
        )
    }

    /// Bytes held by the session plus bytes read and not yet taken.
    pub(crate) fn outstanding(&self) -> u64 {
        let read = self.read.load(Ordering::Acquire);
        let claimed = self.claimed.load(Ordering::Acquire);
        self.held
            .load(Ordering::Acquire)
            .saturating_add(read.saturating_sub(claimed))
    }

    /// The session holds `body` from now on; its bytes count until the
    /// returned value (and every clone of its `Arc`) is dropped.
    pub(crate) fn hold(self: &Arc<Self>, body: Vec<u8>) -> HeldBody {
        self.held.fetch_add(body.len() as u64, Ordering::AcqRel);
        HeldBody {
            body,
            gate: self.clone(),
        }
    }

    /// The session found lapin's delivery buffer empty: everything read so
    /// far was taken (and is counted in `held`) or was no delivery.
    pub(crate) fn claim_all(&self) {
        let read = self.read.load(Ordering::Acquire);
        self.claimed.fetch_max(read, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Reads on regardless of the budget (true) until the lease is renewed.
    pub(crate) fn set_lease_yield(&self, on: bool) {
        if self.lease_yield.swap(on, Ordering::AcqRel) != on && on {
            self.waker.wake();
        }
    }

    /// Dead-letter copies being published now.
    pub(crate) fn dead_letters(&self) -> usize {
        self.dead_letters.load(Ordering::Acquire)
    }

    /// Counts a dead-letter publish until the guard is dropped.
    pub(crate) fn dead_letter_pending(self: &Arc<Self>) -> DeadLetterPending {
        self.dead_letters.fetch_add(1, Ordering::AcqRel);
        DeadLetterPending { gate: self.clone() }
    }

    /// Bytes read from the socket so far.
    pub(crate) fn read_total(&self) -> u64 {
        self.read.load(Ordering::Acquire)
    }

    /// How long since the socket was last read (its data, not an attempt).
    pub(crate) fn unread_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::Acquire));
        self.born.elapsed().saturating_sub(last)
    }

    /// The session is over: read on for good, whatever is still counted, so
    /// that the connection's close handshake is heard instead of waited out.
    pub(crate) fn open_for_good(&self) {
        self.ended.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn release(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// A dead-letter publish in progress (see [`ReadGate::dead_letter_pending`]).
#[derive(Debug)]
pub(crate) struct DeadLetterPending {
    gate: Arc<ReadGate>,
}

impl Drop for DeadLetterPending {
    fn drop(&mut self) {
        self.gate.dead_letters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A delivery's body, counted against the budget while it lives. The one
/// copy the worker keeps of it: shared (behind an `Arc`) by the delivery
/// being worked on and its dead-letter publish, never cloned.
#[derive(Debug)]
pub(crate) struct HeldBody {
    body: Vec<u8>,
    gate: Arc<ReadGate>,
}

impl std::ops::Deref for HeldBody {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.gate.release(self.body.len() as u64);
    }
}

/// A socket that is not read while its gate says so.
#[derive(Debug)]
pub(crate) struct GatedStream<S> {
    inner: S,
    gate: Arc<ReadGate>,
}

impl<S: AsyncRead + Unpin> AsyncRead for GatedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if !self.gate.allowed() {
            self.gate.waker.register(cx.waker());
            // Checked again after registering: a release in between would
            // otherwise wake nobody.
            if !self.gate.allowed() {
                return Poll::Pending;
            }
        }
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.gate.read.fetch_add(*n as u64, Ordering::AcqRel);
            let now = self.gate.born.elapsed().as_millis() as u64;
            self.gate.last_read_ms.fetch_max(now, Ordering::AcqRel);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GatedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// lapin's tokio reactor, whose TCP streams go through a [`ReadGate`]
/// (with TLS, the gate sits under it and counts encrypted bytes).
#[derive(Debug, Clone)]
pub(crate) struct GatedReactor {
    inner: async_rs::Tokio,
    gate: Arc<ReadGate>,
}

impl GatedReactor {
    /// The current tokio runtime's reactor, gated by `gate`.
    pub(crate) fn new(gate: Arc<ReadGate>) -> GatedReactor {
        GatedReactor {
            inner: async_rs::Tokio::current(),
            gate,
        }
    }
}

impl Reactor for GatedReactor {
    type TcpStream = GatedStream<<async_rs::Tokio as Reactor>::TcpStream>;
    type Sleep = <async_rs::Tokio as Reactor>::Sleep;

    fn register<
        H: io::Read + io::Write + std::os::fd::AsFd + std::os::fd::AsRawFd + Send + 'static,
    >(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.inner.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.inner.sleep(dur)
    }

    fn interval(&self, dur: Duration) -> impl Stream<Item = Instant> + Send + 'static {
        self.inner.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connect = self.inner.tcp_connect_addr(addr);
        let gate = self.gate.clone();
        async move {
            Ok(GatedStream {
                inner: connect.await?,
                gate,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reads_stop_at_the_budget_unless_the_lease_needs_an_answer() {
        #[rustfmt::skip]
        let table: &[(u64, u64, bool, bool)] = &[
            // held, unclaimed, lease_yield, allowed (budget 64 MiB)
            (0, 0, false, true),
            (63 * MIB, MIB - 1, false, true),
            (63 * MIB, MIB, false, false),
            (64 * MIB, 0, false, false),
            (0, 64 * MIB, false, false),
            (200 * MIB, 0, true, true),
            (u64::MAX, u64::MAX, false, false),
        ];
        for &(held, unclaimed, lease_yield, want) in table {
            assert_eq!(
                reads_allowed(held, unclaimed, 64 * MIB, lease_yield),
                want,
                "{held} {unclaimed} {lease_yield}"
            );
        }
    }

    #[test]
    fn held_bodies_count_until_the_last_copy_goes() {
        let gate = ReadGate::new(10);
        let a = Arc::new(gate.hold(vec![0; 6]));
        assert!(gate.allowed());
        let b = gate.hold(vec![0; 4]);
        assert!(!gate.allowed());
        assert_eq!(gate.outstanding(), 10);
        let copy = a.clone();
        drop(a);
        assert!(!gate.allowed(), "a copy still holds it");
        drop(copy);
        assert!(gate.allowed());
        drop(b);
        assert_eq!(gate.outstanding(), 0);
        gate.set_lease_yield(true);
        let _c = gate.hold(vec![0; 20]);
        assert!(gate.allowed(), "the lease needs an answer");
    }

    #[test]
    fn unclaimed_reads_count_until_the_buffer_is_found_empty() {
        let gate = ReadGate::new(10);
        gate.read.fetch_add(12, Ordering::AcqRel);
        assert!(!gate.allowed());
        gate.claim_all();
        assert!(gate.allowed());
        assert_eq!(gate.outstanding(), 0);
        let _d = gate.dead_letter_pending();
        assert_eq!(gate.dead_letters(), 1);
        drop(_d);
        assert_eq!(gate.dead_letters(), 0);
    }

    #[test]
    fn an_ended_session_reads_on_for_good() {
        let gate = ReadGate::new(10);
        gate.read.fetch_add(12, Ordering::AcqRel);
        let _held = gate.hold(vec![0; 20]);
        assert!(!gate.allowed());
        gate.open_for_good();
        assert!(gate.allowed(), "the close handshake must be read");
    }
}
