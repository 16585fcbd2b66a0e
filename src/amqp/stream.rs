//! Reading a RabbitMQ stream over the native stream protocol (plugin
//! `rabbitmq_stream`): the broker sends whole chunks of entries, many times
//! faster than an AMQP 0-9-1 consumer with `x-stream-offset`.
//!
//! The frames are the `rabbitmq-stream-protocol` crate's; the entries (AMQP 1.0
//! messages) are decoded here by [`amqp10`], because the crate keeps timestamps
//! and floats behind private fields, exposes one data section only and refuses
//! strings that are not UTF-8 (a 0-9-1 header may hold any bytes).
//! RabbitMQ 3.10 speaks protocol version 1: no StreamStats, so the last offset
//! is found by subscribing at `Last`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::BasicProperties;
use rabbitmq_stream_protocol::codec::{Decoder, Encoder};
use rabbitmq_stream_protocol::commands::{
    close::CloseRequest, credit::CreditCommand, declare_publisher::DeclarePublisherCommand,
    delete_publisher::DeletePublisherCommand, generic::GenericResponse,
    heart_beat::HeartBeatCommand, open::OpenResponse, peer_properties::PeerPropertiesCommand,
    sasl_authenticate::SaslAuthenticateCommand, sasl_handshake::SaslHandshakeCommand,
    subscribe::OffsetSpecification, subscribe::SubscribeCommand, tune::TunesCommand,
    unsubscribe::UnSubscribeCommand,
};
use rabbitmq_stream_protocol::{Request, Response, ResponseCode, ResponseKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, AuthMechanism};

mod amqp10;

/// Chunks the broker may send ahead of the one being read; one credit is
/// given back per chunk received. Reading is bound by the broker's cost per
/// chunk (dead letters are written in small chunks): 3 read 1,000,000 entries
/// in 56,731 chunks at 20,600 msgs/s here, 48 at 33,200. Our memory stays a
/// frame at a time whatever the credit: what is not read yet waits in the
/// socket (5.4 MiB peak RSS either way).
const CREDIT_CHUNKS: u16 = 48;

/// How long [`StreamReader::last_offset`] waits for the last chunk before
/// deciding the stream is empty: the broker sends it right after the
/// subscription's answer, so this is slack for a loaded broker, paid only by
/// empty streams.
pub const EMPTY_STREAM_WAIT: Duration = Duration::from_millis(1000);

/// Time allowed to connect and finish the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// RabbitMQ's stream ports when `stream.listeners` is not set: plain and TLS.
const DEFAULT_PORT: u16 = 5552;
const DEFAULT_TLS_PORT: u16 = 5551;

/// Largest frame accepted from the broker; a chunk is usually up to a few MiB,
/// a length past this means the stream is out of step (or not the protocol).
const MAX_INCOMING_FRAME_BYTES: usize = 256 << 20;

const KEY_DELIVER: u16 = 8;
const KEY_CREDIT: u16 = 9;
const KEY_TUNE: u16 = 20;
const KEY_CLOSE: u16 = 22;
const KEY_HEARTBEAT: u16 = 23;
const KEY_METADATA_UPDATE: u16 = 16;
const KEY_PUBLISH_CONFIRM: u16 = 3;
const KEY_PUBLISH_ERROR: u16 = 4;

/// One entry of a stream, as the AMQP 0-9-1 message it was published as.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamMessage {
    /// The entry's offset in the stream (the dead letter's id).
    pub offset: u64,
    /// When the broker wrote the chunk holding it, Unix milliseconds.
    pub chunk_timestamp_ms: i64,
    /// The AMQP 1.0 application-properties, as AMQP 0-9-1 headers (what a 0-9-1 publisher's headers became).
    pub headers: FieldTable,
    /// The AMQP 1.0 properties / header / message-annotations mapped back to 0-9-1 properties, as far as
    /// RabbitMQ 3.10 maps them (content_type, content_encoding, message_id, correlation_id,
    /// timestamp (creation-time, seconds in 0-9-1), app_id, type (kind), delivery_mode from durable).
    pub properties: BasicProperties,
    /// The body (the data section(s), concatenated).
    pub body: Vec<u8>,
    /// Set when this reader could not decode the entry: the error. The body
    /// is then the raw entry and `headers` holds only the error
    /// (`x-imattr-error`), for showing; it is not a message to act on.
    pub undecodable: Option<String>,
}

/// A connection to RabbitMQ's stream protocol, reading one stream at a time.
pub struct StreamReader {
    reader: FrameReader,
    writer: Arc<Mutex<Box<dyn AsyncWrite + Send + Sync + Unpin>>>,
    /// Where it is connected, `host:port`, for messages.
    peer: String,
    vhost: String,
    next_correlation: u32,
    next_subscription: u8,
    /// Subscriptions asked for and not yet closed. One is left when a read
    /// is given up half-way (a dropped request): the next subscribe closes
    /// it, as only one read runs at a time.
    live: Vec<u8>,
    /// No frame for this long means the broker is gone (it sends heartbeats).
    silence_limit: Option<Duration>,
    /// Stops the heartbeat task.
    stop: CancellationToken,
    /// A write failed or timed out, possibly half-way through a frame:
    /// nothing more may be written or trusted on this connection.
    broken: Arc<AtomicBool>,
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A frame from the broker, its 4-byte length included (what the crate's
/// decoders expect).
#[derive(Debug)]
struct Frame(Vec<u8>);

impl Frame {
    fn key(&self) -> u16 {
        u16::from_be_bytes([self.0[4], self.0[5]]) & 0x7fff
    }
    fn version(&self) -> u16 {
        u16::from_be_bytes([self.0[6], self.0[7]])
    }
}

impl StreamReader {
    /// Connects to the first node of `cfg.url` that answers, in the listed
    /// order (same user, password, vhost, host and TLS settings as its URL),
    /// on port `cfg.stream_port` (0: the broker's default): with a node down,
    /// the dead letters are still read from another. `name` is the
    /// connection name shown in the management UI (client property connection_name).
    pub async fn connect(cfg: &AmqpConfig, name: &str) -> anyhow::Result<StreamReader> {
        let nodes = cfg.nodes();
        let count = nodes.len();
        let mut last = None;
        for (index, node) in nodes.iter().enumerate() {
            match StreamReader::connect_node(cfg, node, name).await {
                Ok(reader) => return Ok(reader),
                Err(e) => {
                    tracing::debug!(
                        node = index,
                        error = format!("{e:#}"),
                        "Stream protocol not reached on this broker node; trying the next"
                    );
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) if count > 1 => Err(e.context(format!(
                "none of the {count} nodes of amqp.url answered over the stream protocol (the last one's error follows)"
            ))),
            Some(e) => Err(e),
            None => bail!("amqp.url holds no URL"),
        }
    }

    /// [`StreamReader::connect`] to one node, `node` (a configuration of one URL).
    async fn connect_node(
        cfg: &AmqpConfig,
        node: &AmqpConfig,
        name: &str,
    ) -> anyhow::Result<StreamReader> {
        let uri: AMQPUri =
            node.url.expose().parse().map_err(|_: String| {
                anyhow!("amqp.url is not a valid AMQP URL (got {})", node.url)
            })?;
        let tls = uri.scheme == AMQPScheme::AMQPS;
        // With amqps:// the connection's TLS settings are checked before any
        // connection is tried, so a bad file is named whatever the broker does.
        let tls_config = if tls {
            Some(super::tls::client_config(cfg)?)
        } else {
            None
        };
        let external = cfg.auth_mechanism == AuthMechanism::External;
        if external && !tls {
            bail!("reading a stream needs amqp.auth_mechanism = \"plain\" (EXTERNAL needs TLS)");
        }
        let port = match (cfg.stream_port, tls) {
            (0, false) => DEFAULT_PORT,
            (0, true) => DEFAULT_TLS_PORT,
            (p, _) => p,
        };
        let host = uri.authority.host.clone();
        let peer = format!("{host}:{port}");
        let not_answering = || {
            if tls {
                format!(
                    "RabbitMQ's stream protocol over TLS is not answering on {peer}; enable it with \
                     `rabbitmq-plugins enable rabbitmq_stream` and a TLS listener \
                     (stream.listeners.ssl.1 = {port}), or set amqp.stream_port"
                )
            } else {
                format!(
                    "RabbitMQ's stream protocol is not answering on {peer}; enable it with \
                     `rabbitmq-plugins enable rabbitmq_stream` (or set amqp.stream_port)"
                )
            }
        };
        let socket =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| anyhow!("timed out connecting"))
                .and_then(|r| r.map_err(anyhow::Error::from))
                .with_context(not_answering)?;
        let _ = socket.set_nodelay(true);
        let (read, write): (
            Box<dyn AsyncRead + Send + Sync + Unpin>,
            Box<dyn AsyncWrite + Send + Sync + Unpin>,
        ) = match tls_config {
            None => {
                let (r, w) = socket.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                    anyhow!("amqp.url's host {host:?} is not a valid TLS server name")
                })?;
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(config).connect(name, socket),
                )
                .await
                .map_err(|_| anyhow!("{peer} did not finish the TLS handshake in time"))?
                .map_err(|e| super::tls::explain(e, cfg))
                .with_context(|| format!("TLS to RabbitMQ's stream port {peer}"))?;
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
        };
        let mut reader = StreamReader {
            reader: FrameReader::new(read),
            writer: Arc::new(Mutex::new(write)),
            peer: peer.clone(),
            vhost: uri.vhost.clone(),
            next_correlation: 1,
            next_subscription: 0,
            live: Vec::new(),
            silence_limit: None,
            stop: CancellationToken::new(),
            broken: Arc::new(AtomicBool::new(false)),
        };
        let user = uri.authority.userinfo.username.clone();
        let password = uri.authority.userinfo.password.clone();
        let heartbeat = tokio::time::timeout(
            CONNECT_TIMEOUT,
            reader.handshake(name, &user, &password, external),
        )
        .await
        .map_err(|_| anyhow!("{peer} did not finish the stream protocol handshake in time"))
        .with_context(not_answering)??;
        reader.start_heartbeats(heartbeat);
        Ok(reader)
    }

    /// Peer properties, SASL PLAIN, Tune, Open; returns the heartbeat in seconds.
    async fn handshake(
        &mut self,
        name: &str,
        user: &str,
        password: &str,
        external: bool,
    ) -> anyhow::Result<u32> {
        let props = HashMap::from([
            ("connection_name".to_string(), name.to_string()),
            ("product".to_string(), "imattr".to_string()),
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        let id = self.correlation();
        self.send(PeerPropertiesCommand::new(id, props)).await?;
        self.response(id).await.with_context(|| {
            format!("{} did not answer as RabbitMQ's stream protocol", self.peer)
        })?;

        let id = self.correlation();
        self.send(SaslHandshakeCommand::new(id)).await?;
        self.response(id).await?;

        let id = self.correlation();
        // EXTERNAL takes the user from the client certificate, as on the AMQP port.
        let (mechanism, auth) = if external {
            ("EXTERNAL", Vec::new())
        } else {
            ("PLAIN", format!("\0{user}\0{password}").into_bytes())
        };
        self.send(SaslAuthenticateCommand::new(id, mechanism.into(), auth))
            .await?;
        let answer = self.response(id).await.map_err(|e| {
            if external {
                // RabbitMQ's stream plugin crashed on EXTERNAL until a fix of
                // mid-2023 (3.10.8 does, closing the connection).
                anyhow!(
                    "the broker closed the stream connection at the EXTERNAL login ({e:#}); \
                     older RabbitMQ releases (3.10.8 among them) do not support EXTERNAL on the \
                     stream protocol: upgrade RabbitMQ, or run the dlq commands with \
                     amqp.auth_mechanism = \"plain\""
                )
            } else {
                e
            }
        })?;
        match answer.get::<GenericResponse>() {
            Some(r) if r.is_ok() => {}
            Some(r) if external => bail!(
                "the broker refused the EXTERNAL stream login ({:?}); is rabbitmq_auth_mechanism_ssl \
                 enabled, and does a user named after the certificate exist with access to the vhost?",
                r.code()
            ),
            Some(r) => bail!(
                "the broker refused the stream login ({:?}); check the user and password in amqp.url",
                r.code()
            ),
            None => bail!("unexpected answer to the stream login"),
        }

        // The broker proposes its frame size and heartbeat; taking them as they are
        // keeps our frames within its limit and answers its heartbeat cadence.
        let tune = loop {
            let frame = self.read_frame().await?;
            if frame.key() == KEY_TUNE {
                let (_, r) = Response::decode(&frame.0).map_err(decode_error)?;
                match r.kind() {
                    ResponseKind::Tunes(t) => break t,
                    _ => bail!("unexpected Tune frame"),
                }
            }
        };
        self.send(TunesCommand::new(tune.max_frame_size, tune.heartbeat))
            .await?;
        if tune.heartbeat > 0 {
            self.silence_limit = Some(Duration::from_secs(u64::from(tune.heartbeat) * 3));
        }

        let id = self.correlation();
        let vhost = self.vhost.clone();
        self.send(rabbitmq_stream_protocol::commands::open::OpenCommand::new(
            id,
            vhost.clone(),
        ))
        .await?;
        let answer = self.response(id).await?;
        match answer.get::<OpenResponse>() {
            Some(r) if r.is_ok() => Ok(tune.heartbeat),
            Some(r) => bail!(
                "the broker refused to open vhost {vhost:?} over the stream protocol ({:?}); \
                 check the vhost in amqp.url and the user's access to it",
                r.code()
            ),
            None => bail!("unexpected answer to opening vhost {vhost:?}"),
        }
    }

    /// Sends a heartbeat every half heartbeat interval until dropped or
    /// closed, so that the broker keeps the connection while the caller is
    /// busy or idle between reads.
    fn start_heartbeats(&self, heartbeat_secs: u32) {
        if heartbeat_secs == 0 {
            return;
        }
        let every = Duration::from_millis(u64::from(heartbeat_secs) * 500);
        let writer = self.writer.clone();
        let stop = self.stop.clone();
        let broken = self.broken.clone();
        let frame = encode(HeartBeatCommand::default());
        tokio::spawn(async move {
            let Ok(frame) = frame else { return };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let write = async { writer.lock().await.write_all(&frame).await };
                        if !matches!(tokio::time::timeout(CONNECT_TIMEOUT, write).await, Ok(Ok(()))) {
                            broken.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Offset of the last entry now in `stream`, None when it has none. An
    /// empty stream delivers nothing: it is taken as empty after
    /// [`EMPTY_STREAM_WAIT`].
    pub async fn last_offset(&mut self, stream: &str) -> anyhow::Result<Option<u64>> {
        self.last_offset_within(stream, EMPTY_STREAM_WAIT).await
    }

    /// [`StreamReader::last_offset`], waiting `wait` for the last chunk.
    pub async fn last_offset_within(
        &mut self,
        stream: &str,
        wait: Duration,
    ) -> anyhow::Result<Option<u64>> {
        self.probe(stream, OffsetSpecification::Last, wait, |c| c.last_offset())
            .await
    }

    /// Offset of the first entry still in `stream` (retention drops whole
    /// old segments), None when it has none (after [`EMPTY_STREAM_WAIT`]).
    pub async fn first_offset(&mut self, stream: &str) -> anyhow::Result<Option<u64>> {
        self.first_offset_within(stream, EMPTY_STREAM_WAIT).await
    }

    /// [`StreamReader::first_offset`], waiting `wait` for the first chunk.
    pub async fn first_offset_within(
        &mut self,
        stream: &str,
        wait: Duration,
    ) -> anyhow::Result<Option<u64>> {
        self.probe(stream, OffsetSpecification::First, wait, |c| {
            Some(c.first_offset)
        })
        .await
    }

    /// `offset_of` the one chunk delivered from `at`; None when none comes
    /// within `wait` (an empty stream delivers nothing).
    async fn probe(
        &mut self,
        stream: &str,
        at: OffsetSpecification,
        wait: Duration,
        offset_of: impl Fn(&Chunk) -> Option<u64>,
    ) -> anyhow::Result<Option<u64>> {
        let sub = self.subscribe(stream, at, 1).await?;
        let found = match tokio::time::timeout(wait, self.next_chunk(sub)).await {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(e),
            Ok(Ok(frame)) => Chunk::parse(&frame).map(|c| offset_of(&c)),
        };
        let unsubscribed = self.unsubscribe(sub).await;
        let found = found?;
        unsubscribed?;
        Ok(found)
    }

    /// Calls `f` with every entry whose offset is in from..=until, in offset order (entries before `from`
    /// in the first chunk are skipped; a `from` older than the stream's first offset starts at the first).
    /// Stops when `f` returns ControlFlow::Break(()) or after `until`. Memory is bounded (a few chunks in
    /// flight: credit-based flow), whatever the stream holds. Returns how many entries `f` saw.
    ///
    /// Entries up to `until` are waited for: pass an `until` at most [`StreamReader::last_offset`].
    pub async fn read<F>(
        &mut self,
        stream: &str,
        from: u64,
        until: u64,
        mut f: F,
    ) -> anyhow::Result<u64>
    where
        F: FnMut(StreamMessage) -> ControlFlow<()>,
    {
        if from > until {
            return Ok(0);
        }
        let sub = self
            .subscribe(stream, OffsetSpecification::Offset(from), CREDIT_CHUNKS)
            .await?;
        let seen = self.deliver_range(sub, from, until, &mut f).await;
        let unsubscribed = self.unsubscribe(sub).await;
        let seen = seen?;
        unsubscribed?;
        Ok(seen)
    }

    async fn deliver_range<F>(
        &mut self,
        sub: u8,
        from: u64,
        until: u64,
        f: &mut F,
    ) -> anyhow::Result<u64>
    where
        F: FnMut(StreamMessage) -> ControlFlow<()>,
    {
        let mut seen = 0u64;
        loop {
            let frame = self.next_chunk(sub).await?;
            // Credit back at once: the broker reads the next chunk while this one is decoded.
            self.send(CreditCommand::new(sub, 1)).await?;
            let chunk = Chunk::parse(&frame)?;
            for (offset, entry) in chunk.entries() {
                let entry = entry?;
                if offset < from {
                    continue;
                }
                if offset > until {
                    return Ok(seen);
                }
                let (message, undecodable) = match amqp10::decode(entry) {
                    Ok(m) => (m, None),
                    Err(e) => (unreadable(offset, entry, &e), Some(e.to_string())),
                };
                seen += 1;
                let flow = f(StreamMessage {
                    offset,
                    chunk_timestamp_ms: chunk.timestamp_ms,
                    headers: message.headers,
                    properties: message.properties,
                    body: message.body,
                    undecodable,
                });
                if flow.is_break() || offset == until {
                    return Ok(seen);
                }
            }
        }
    }

    /// Appends `entries` to `stream` as they are, bytes the broker does not
    /// look into (the stream protocol's Publish): how a test stores an
    /// entry that is not the AMQP 1.0 RabbitMQ writes. Waits for the
    /// broker's confirm of each.
    #[doc(hidden)]
    pub async fn publish_raw(&mut self, stream: &str, entries: &[&[u8]]) -> anyhow::Result<()> {
        const PUBLISHER: u8 = 0;
        let id = self.correlation();
        self.send(DeclarePublisherCommand::new(
            id,
            PUBLISHER,
            None,
            stream.to_string(),
        ))
        .await?;
        let answer = self.response(id).await?;
        match answer.get::<GenericResponse>() {
            Some(r) if r.is_ok() => {}
            Some(r) => bail!(
                "declaring a publisher on {stream:?} failed ({:?})",
                r.code()
            ),
            None => bail!("unexpected answer to declaring a publisher on {stream:?}"),
        }
        // Publish: key 2, version 1, publisher id, [publishing id, bytes].
        let mut body = vec![0, 2, 0, 1, PUBLISHER];
        body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (i, e) in entries.iter().enumerate() {
            body.extend_from_slice(&(i as u64).to_be_bytes());
            body.extend_from_slice(&(e.len() as u32).to_be_bytes());
            body.extend_from_slice(e);
        }
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.write_frame(frame).await?;
        let mut confirmed = 0usize;
        while confirmed < entries.len() {
            let frame = self.read_frame().await?;
            match frame.key() {
                // PublishConfirm: publisher id, then an array of publishing ids.
                KEY_PUBLISH_CONFIRM => {
                    let n = frame
                        .0
                        .get(9..13)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    confirmed += n as usize;
                }
                KEY_PUBLISH_ERROR => bail!("the broker refused a raw entry for {stream:?}"),
                _ => {}
            }
        }
        let id = self.correlation();
        self.send(DeletePublisherCommand::new(id, PUBLISHER))
            .await?;
        self.response(id).await?;
        Ok(())
    }

    /// Closes cleanly (Close command), best effort.
    pub async fn close(mut self) {
        let id = self.correlation();
        let closing = async {
            self.send(CloseRequest::new(id, ResponseCode::Ok, "done".into()))
                .await?;
            self.response(id).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        self.stop.cancel();
        let _ = self.writer.lock().await.shutdown().await;
    }

    async fn subscribe(
        &mut self,
        stream: &str,
        offset: OffsetSpecification,
        credit: u16,
    ) -> anyhow::Result<u8> {
        // A stale one may never have reached the broker: `unsubscribe` does
        // not look at the answer.
        while let Some(&stale) = self.live.first() {
            self.unsubscribe(stale).await?;
        }
        let sub = self.next_subscription;
        self.next_subscription = self.next_subscription.wrapping_add(1);
        // Live from before it is asked for: given up before the answer, it
        // may exist on the broker.
        self.live.push(sub);
        let id = self.correlation();
        self.send(SubscribeCommand::new(
            id,
            sub,
            stream.to_string(),
            offset,
            credit,
            HashMap::new(),
        ))
        .await?;
        let answer = self.response(id).await?.get::<GenericResponse>();
        if !answer.as_ref().is_some_and(|r| r.is_ok()) {
            self.live.retain(|&s| s != sub);
        }
        match answer {
            Some(r) if r.is_ok() => Ok(sub),
            Some(r) => match r.code() {
                ResponseCode::StreamDoesNotExist => bail!(
                    "stream {stream:?} does not exist in vhost {:?} (or is a queue, not a stream)",
                    self.vhost
                ),
                ResponseCode::StreamNotAvailable => {
                    bail!("stream {stream:?} is not available now (its leader is being elected?)")
                }
                ResponseCode::AccessRefused => {
                    bail!("the broker refused reading stream {stream:?} (no read permission)")
                }
                code => bail!("subscribing to stream {stream:?} failed ({code:?})"),
            },
            None => bail!("unexpected answer to subscribing to stream {stream:?}"),
        }
    }

    /// Unsubscribes; chunks already on their way are read and dropped until
    /// the broker's answer, after which none comes.
    async fn unsubscribe(&mut self, sub: u8) -> anyhow::Result<()> {
        let id = self.correlation();
        self.send(UnSubscribeCommand::new(id, sub)).await?;
        self.response(id).await?;
        self.live.retain(|&s| s != sub);
        Ok(())
    }

    /// The next Deliver frame of subscription `sub`.
    async fn next_chunk(&mut self, sub: u8) -> anyhow::Result<Frame> {
        loop {
            let frame = self.read_frame().await?;
            if frame.key() == KEY_DELIVER && frame.0.get(8) == Some(&sub) {
                return Ok(frame);
            }
            // The broker tells a subscriber that its stream was deleted or
            // lost its leader, then sends nothing more on that subscription.
            if frame.key() == KEY_METADATA_UPDATE {
                bail!(
                    "the stream changed while it was read (deleted, or its leader moved); run the command again"
                );
            }
        }
    }

    /// Reads frames until the response with correlation id `id`.
    async fn response(&mut self, id: u32) -> anyhow::Result<Response> {
        loop {
            let frame = self.read_frame().await?;
            match frame.key() {
                KEY_DELIVER | KEY_TUNE | KEY_CREDIT | KEY_METADATA_UPDATE => continue,
                _ => {}
            }
            let (_, response) = Response::decode(&frame.0).map_err(decode_error)?;
            if response.correlation_id() == Some(id) {
                return Ok(response);
            }
        }
    }

    /// Reads one frame; heartbeats are skipped, a Close from the broker is an error.
    async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        self.check_whole()?;
        loop {
            let frame = match self.silence_limit {
                Some(limit) => tokio::time::timeout(limit, self.reader.next())
                    .await
                    .map_err(|_| {
                        anyhow!(
                            "{} sent nothing for {limit:?}, not even heartbeats",
                            self.peer
                        )
                    })?,
                None => self.reader.next().await,
            }
            .with_context(|| format!("reading from {}", self.peer))?;
            match frame.key() {
                KEY_HEARTBEAT => continue,
                KEY_CLOSE if frame.0[4] & 0x80 == 0 => {
                    let reason = close_reason(&frame.0[8..]);
                    bail!("the broker closed the stream connection: {reason}");
                }
                _ => return Ok(frame),
            }
        }
    }

    async fn send(&self, request: impl Into<Request>) -> anyhow::Result<()> {
        self.write_frame(encode(request)?).await
    }

    /// Writes a frame whole even when the caller is dropped mid-way (a
    /// frame cut short would garble everything written after it): the
    /// writer is taken here, in call order, and the write runs in its own
    /// task, bounded in time.
    async fn write_frame(&self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.check_whole()?;
        let took_nothing = || anyhow!("{} took no data for {CONNECT_TIMEOUT:?}", self.peer);
        let mut writer = tokio::time::timeout(CONNECT_TIMEOUT, self.writer.clone().lock_owned())
            .await
            .map_err(|_| took_nothing())?;
        let broken = self.broken.clone();
        let write = tokio::spawn(async move {
            let written = tokio::time::timeout(CONNECT_TIMEOUT, writer.write_all(&bytes)).await;
            if !matches!(written, Ok(Ok(()))) {
                broken.store(true, Ordering::Relaxed);
            }
            written
        });
        write
            .await
            .map_err(|e| anyhow!("the write task failed: {e}"))?
            .map_err(|_| took_nothing())?
            .with_context(|| format!("writing to {}", self.peer))
    }

    /// Fails once a write failed or timed out: what follows it on the wire
    /// may be read by the broker as the rest of a cut frame.
    fn check_whole(&self) -> anyhow::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            bail!(
                "the stream connection to {} failed on an earlier write; run the command again",
                self.peer
            );
        }
        Ok(())
    }

    fn correlation(&mut self) -> u32 {
        let id = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        id
    }
}

fn encode(request: impl Into<Request>) -> anyhow::Result<Vec<u8>> {
    let request: Request = request.into();
    let mut bytes = Vec::with_capacity(request.encoded_size() as usize + 4);
    request
        .encode(&mut bytes)
        .map_err(|e| anyhow!("encoding a stream protocol request: {e:?}"))?;
    Ok(bytes)
}

fn decode_error(e: rabbitmq_stream_protocol::error::DecodeError) -> anyhow::Error {
    anyhow!("undecodable stream protocol frame: {e:?}")
}

/// Frames off the connection. Cancel-safe: a read given up half-way (a
/// timeout, a dropped request) keeps what it had, so the next read goes on
/// at the same frame instead of taking its middle for a length.
struct FrameReader {
    inner: BufReader<Box<dyn AsyncRead + Send + Sync + Unpin>>,
    /// Bytes read of the frames not yet returned.
    pending: Vec<u8>,
}

impl FrameReader {
    fn new(read: Box<dyn AsyncRead + Send + Sync + Unpin>) -> FrameReader {
        FrameReader {
            inner: BufReader::with_capacity(256 << 10, read),
            pending: Vec::new(),
        }
    }

    async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            let mut need = 4;
            if let Some(head) = self.pending.first_chunk::<4>() {
                let len = u32::from_be_bytes(*head) as usize;
                if !(4..=MAX_INCOMING_FRAME_BYTES).contains(&len) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("a frame of {len} bytes: not RabbitMQ's stream protocol?"),
                    ));
                }
                need = len + 4;
                if self.pending.len() >= need {
                    let rest = self.pending.split_off(need);
                    return Ok(Frame(std::mem::replace(&mut self.pending, rest)));
                }
            }
            self.pending.reserve(need - self.pending.len());
            // `read_buf` is cancel-safe: dropped before it returns, it read nothing.
            if self.inner.read_buf(&mut self.pending).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// An entry this reader cannot decode, delivered rather than failing the
/// read: one odd entry must not keep every command from the rest of the
/// store. Its raw bytes are the body; the error header says what went wrong.
fn unreadable(offset: u64, entry: &[u8], e: &amqp10::Amqp10Error) -> amqp10::Decoded {
    // Debug: every read of the store meets it again, and it is shown with its error.
    tracing::debug!(offset, error = %e, "Stream entry not decodable; delivered as raw bytes");
    let mut headers = FieldTable::default();
    headers.insert(
        crate::amqp::deadletter::H_ERROR.into(),
        lapin::types::AMQPValue::LongString(
            format!("the store could not decode this entry (AMQP 1.0): {e}").into(),
        ),
    );
    amqp10::Decoded {
        headers,
        properties: BasicProperties::default(),
        body: entry.to_vec(),
    }
}

/// The code and reason of a Close request's body (correlation id, code, string).
fn close_reason(body: &[u8]) -> String {
    let code = body.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let reason = body
        .get(6..8)
        .map(|b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize)
        .and_then(|n| body.get(8..8 + n))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    format!("{reason} (code {})", code.unwrap_or(0))
}

/// A Deliver frame's chunk: header fields and its entries.
struct Chunk<'a> {
    timestamp_ms: i64,
    first_offset: u64,
    num_entries: u16,
    data: &'a [u8],
}

impl<'a> Chunk<'a> {
    fn parse(frame: &'a Frame) -> anyhow::Result<Chunk<'a>> {
        let b = &frame.0;
        // size(4) key(2) version(2) subscription(1), then v2's committed offset.
        let start = if frame.version() >= 2 { 17 } else { 9 };
        let h = b
            .get(start..start + 48)
            .ok_or_else(|| anyhow!("a Deliver frame shorter than a chunk header"))?;
        let be64 = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
        let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap_or([0; 4]));
        let chunk_type = h[1];
        let num_entries = u16::from_be_bytes([h[2], h[3]]);
        let timestamp_ms = be64(8) as i64;
        let first_offset = be64(24);
        let data_len = be32(36) as usize;
        if chunk_type != 0 {
            // Offset-tracking chunks hold no messages: their offsets are
            // passed over, not read as dead letters.
            return Ok(Chunk {
                timestamp_ms,
                first_offset,
                num_entries,
                data: &[],
            });
        }
        let data = b
            .get(start + 48..start + 48 + data_len)
            .ok_or_else(|| anyhow!("a Deliver frame shorter than its chunk's data"))?;
        Ok(Chunk {
            timestamp_ms,
            first_offset,
            num_entries,
            data,
        })
    }

    fn last_offset(&self) -> Option<u64> {
        (self.num_entries > 0).then(|| self.first_offset + u64::from(self.num_entries) - 1)
    }

    /// The entries with their offsets; a sub-entry batch (compressed entries,
    /// written by stream-protocol publishers only) is an error.
    fn entries(&self) -> impl Iterator<Item = (u64, anyhow::Result<&'a [u8]>)> + '_ {
        let mut at = 0usize;
        let data = self.data;
        (0..u64::from(self.num_entries)).map_while(move |i| {
            let offset = self.first_offset + i;
            let head = data.get(at..at + 4)?;
            if head[0] & 0x80 != 0 {
                at = data.len();
                return Some((
                    offset,
                    Err(anyhow!("the entry at offset {offset} is a sub-entry batch, which this reader does not read")),
                ));
            }
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let entry = data.get(at + 4..at + 4 + len);
            at += 4 + len;
            Some((
                offset,
                entry.ok_or_else(|| anyhow!("the entry at offset {offset} runs past its chunk")),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    /// A read given up in the middle of a frame (a timeout, a dropped
    /// request) leaves the next read at that frame, whole.
    #[tokio::test(start_paused = true)]
    async fn a_read_given_up_half_way_loses_no_byte() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = FrameReader::new(Box::new(rx));
        let first = frame(b"0123456789abcdef");
        let second = frame(b"next");
        tx.write_all(&first[..9]).await.unwrap();
        let given_up = tokio::time::timeout(Duration::from_secs(1), r.next()).await;
        assert!(given_up.is_err(), "half a frame is not a frame");
        tx.write_all(&first[9..]).await.unwrap();
        tx.write_all(&second).await.unwrap();
        assert_eq!(r.next().await.unwrap().0, first);
        assert_eq!(r.next().await.unwrap().0, second);
        // Half a length, given up, then the rest.
        let third = frame(b"third");
        tx.write_all(&third[..2]).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(1), r.next())
            .await
            .is_err());
        tx.write_all(&third[2..]).await.unwrap();
        assert_eq!(r.next().await.unwrap().0, third);
    }

    /// An entry the decoder refuses is delivered as its raw bytes with an
    /// error header the dead-letter commands show, not as a failed read.
    #[test]
    fn an_undecodable_entry_is_delivered_raw_with_its_error() {
        let raw = b"\x00\x53\x99not amqp 1.0";
        let e = amqp10::decode(raw).unwrap_err();
        let m = unreadable(7, raw, &e);
        assert_eq!(m.body, raw);
        let error = m
            .headers
            .inner()
            .get(crate::amqp::deadletter::H_ERROR)
            .cloned();
        assert!(
            matches!(&error, Some(lapin::types::AMQPValue::LongString(s)) if s.to_string().starts_with("the store could not decode this entry")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_length_out_of_bounds_is_not_the_stream_protocol() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(Box::new(rx));
        tx.write_all(b"HTTP/1.1 400").await.unwrap();
        let e = r.next().await.unwrap_err();
        assert!(
            e.to_string().contains("not RabbitMQ's stream protocol"),
            "{e}"
        );
        drop(tx);
        let (tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(Box::new(rx));
        drop(tx);
        assert_eq!(
            r.next().await.unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }
}
