//! Redaction fails closed: a property test over broker URLs whose password
//! holds any characters, and secret keys likewise, through every path that
//! prints them: `imattr config`, `Debug`, validation and loading errors,
//! connection errors and the worker's logs (captured with a subscriber that
//! writes to a buffer).
//!
//! Each generated password is `p0 M0 p1 M1 p2 M2 p3`: arbitrary pieces (URL
//! delimiters, quotes, control characters, any Unicode) around three marker
//! words. A redactor that shows any stretch of the password that reaches a
//! marker is caught; the markers are plain letters, so no escaping (TOML,
//! JSON, percent-encoding) hides them.
#![allow(clippy::result_large_err)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use figment::Jail;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::{AmqpUrl, Config, Secret};

const MARKS: [&str; 3] = ["Qx7Pwq", "Zk3Rvz", "Mj9Tnm"];

/// Characters that URL parsers, TOML, JSON and the environment treat specially.
const NASTY: &[char] = &[
    '@', '/', ':', '#', '?', ',', '%', '"', '\\', ' ', '\n', '\t', '\r', '[', ']', '=', '&', ';',
    '\'', '{', '}', '*', '<', '>', '\u{7f}', '\u{1b}', 'é', '字', '\u{feff}',
];

fn piece() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<char>().prop_filter("no NUL (the environment cannot hold it)", |c| *c != '\0'),
            5 => prop::sample::select(NASTY),
            2 => prop::char::range('a', 'z'),
        ],
        0..6,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// A secret: arbitrary pieces around the markers.
fn secret() -> impl Strategy<Value = String> {
    (piece(), piece(), piece(), piece()).prop_map(|(p0, p1, p2, p3)| {
        format!("{p0}{}{p1}{}{p2}{}{p3}", MARKS[0], MARKS[1], MARKS[2])
    })
}

/// A broker URL in one of the shapes users write (or mistype), with the
/// password `pw`; its hosts are loopback and its port `port`.
fn url_with(shape: usize, user: &str, pw: &str, port: u32) -> String {
    match shape {
        0 => format!("amqp://{user}:{pw}@127.0.0.1:{port}/%2f"),
        1 => format!("amqps://{user}:{pw}@localhost:{port}/prod"),
        2 => format!("amqp:/{user}:{pw}@127.0.0.1:{port}/%2f"),
        3 => format!("amqp:{user}:{pw}@127.0.0.1:{port}"),
        4 => format!(
            "amqp://{user}:{pw}@127.0.0.1:{port}/%2f,amqp://{user}:{pw}@localhost:{port}/%2f"
        ),
        5 => format!("amqp://127.0.0.1:{port},amqp://{user}:{pw}@localhost:{port}"),
        6 => format!("{user}:{pw}@127.0.0.1:{port}"),
        _ => format!("amqp://{user}:{pw}@127.0.0.1:{port}/%2f?heartbeat=10"),
    }
}

/// `s` percent-encoded for a URL's userinfo: every byte but the ones the URL
/// parser leaves as they are, so that any password can be written validly.
fn userinfo_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Whether `text` shows any marker, that is some of a secret.
fn leaks(text: &str) -> Option<&'static str> {
    MARKS.iter().copied().find(|m| text.contains(m))
}

/// A port nothing listens on, so that connecting is refused at once.
fn closed_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    })
}

/// A writer into a shared buffer, for a tracing subscriber.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn no_files() -> ProptestConfig {
    ProptestConfig {
        // Nothing written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(no_files())]

    /// `imattr config`, `Debug`, validation, and loading from the
    /// environment (errors and the printed configuration).
    #[test]
    fn no_password_is_printed_by_config_debug_or_errors(
        shape in 0usize..8,
        user in "[a-z]{1,6}",
        pw in secret(),
        key in secret(),
        port in prop_oneof![Just(5672u32), Just(99_999u32), 0u32..70_000],
    ) {
        let url = url_with(shape, &user, &pw, port);
        let mut c = Config::default();
        c.amqp.url = AmqpUrl::new(url.clone());
        c.tencent.secret_key = Secret::new(key.clone());
        let mut shown = vec![
            format!("{}", c.amqp.url),
            format!("{:?}", c.amqp.url),
            format!("{c:?}"),
            format!("{:#?}", c.amqp.nodes()),
            c.to_redacted_toml(),
        ];
        if let Err(e) = c.validate() {
            shown.push(e.to_string());
        }
        for node in c.amqp.nodes() {
            if let Err(e) = super::check_amqp_url(node.url.expose()) {
                shown.push(e);
            }
        }
        let mut loaded = None;
        Jail::expect_with(|jail| {
            jail.set_env("IMATTR_AMQP__URL", &url);
            jail.set_env("IMATTR_TENCENT__SECRET_KEY", &key);
            loaded = Some(Config::load(None));
            Ok(())
        });
        match loaded.expect("the jail ran") {
            Ok(loaded) => {
                // Taken byte for byte from the environment.
                prop_assert_eq!(loaded.amqp.url.expose(), url.as_str());
                prop_assert_eq!(loaded.tencent.secret_key.expose(), key.as_str());
                shown.push(loaded.to_redacted_toml());
                shown.push(format!("{loaded:?}"));
            }
            Err(e) => shown.push(e.to_string()),
        }
        for text in &shown {
            prop_assert!(leaks(text).is_none(), "{url:?} shows its password: {text}");
        }
    }

    /// Connecting and the worker's logs at TRACE, everything included
    /// (lapin's too), for the URLs that pass validation, as in `imattr run`.
    #[test]
    fn no_password_or_key_reaches_connection_errors_or_logs(
        shape in prop_oneof![Just(0usize), Just(4), Just(7)],
        user in "[a-z]{1,6}",
        pw in secret(),
        key in secret(),
    ) {
        // Any password, written validly (loading refuses the others before
        // any work); the client decodes it, so neither form may show.
        let url = url_with(shape, &user, &userinfo_encoded(&pw), u32::from(closed_port()));
        let mut c = Config::default();
        c.amqp.url = AmqpUrl::new(url.clone());
        prop_assert!(c.validate().is_ok(), "{url}: {:?}", c.validate());
        c.tencent.secret_key = Secret::new(key);
        c.tencent.sdkappid = 1_400_000_000;
        // Nothing answers there: the attribute-name request fails at once.
        c.tencent.base_url = format!("http://127.0.0.1:{}", closed_port());
        c.attributes.allowed = vec!["a".into()];
        c.admin.listen = String::new();
        let logs = Buffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut shown = Vec::new();
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                for node in c.amqp.nodes() {
                    match crate::amqp::connect::connect(&node, "redaction test").await {
                        Ok(conn) => {
                            let _ = conn.close(200, "test".into()).await;
                        }
                        Err(e) => shown.push(format!("{e} / {e:?}")),
                    }
                }
                let cancel = CancellationToken::new();
                let health = Arc::new(crate::health::Health::default());
                let worker = tokio::spawn(crate::worker::run(c.clone(), cancel.clone(), health));
                // Until both failures are logged: the broker's and the API's.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while !(logs.text().contains("Cannot reach RabbitMQ")
                    && logs.text().contains("The API refuses a first request"))
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cancel.cancel();
                if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(10), worker).await {
                    shown.push(format!("{e:#} / {e:?}"));
                }
            });
        });
        let text = logs.text();
        prop_assert!(text.contains("Cannot reach RabbitMQ"), "{text}");
        shown.push(text);
        for text in &shown {
            prop_assert!(leaks(text).is_none(), "{url:?} or the key is shown: {text}");
            prop_assert!(!text.contains("usersig="), "a usersig is shown: {text}");
        }
    }
}

/// The types that hold the key or a UserSig show neither in `Debug`.
#[test]
fn signers_clients_and_simulator_options_hide_their_secrets() {
    let key = format!("{}{}", MARKS[0], MARKS[1]);
    let signer =
        crate::tencent::Signer::from_key(Secret::new(key.clone()), 1_400_000_000, "admin", 86400);
    let usersig = signer.usersig();
    let doc = crate::tencent::usersig::decode_usersig(&usersig).unwrap();
    let client = crate::tencent::Client::new(
        "http://127.0.0.1:1",
        Arc::new(signer),
        Duration::from_secs(5),
        100,
        1,
    )
    .unwrap();
    let sim = crate::simulator::SimOptions {
        secret_key: key.clone(),
        ..Default::default()
    };
    for text in [
        format!("{:?}", client.signer()),
        format!("{client:?}"),
        format!("{sim:?}"),
        format!("{doc:?}"),
    ] {
        assert!(leaks(&text).is_none(), "{text}");
        assert!(!text.contains(&usersig), "{text}");
        assert!(!text.contains(&doc.sig), "{text}");
    }
}
