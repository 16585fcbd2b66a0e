//! A real browser for the console's tests: Debian's headless `chromium`
//! driven through `chromedriver` (WebDriver) on a free port, and screenshots.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One chromedriver with one headless Chromium session.
pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
}

impl Browser {
    /// Starts chromedriver and a session (`.ci/run` installs `chromium` and
    /// `chromium-driver`; `apt-get install -y chromium chromium-driver`).
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver must be installed (apt-get install -y chromium chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(format!("{url}/status")).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1500",
                    "--hide-scrollbars",
                ]
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session with headless Chromium");
        Browser { client, driver }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the element `css`, once it is there: a click that
    /// submits a form can return before the next page has loaded. Fails
    /// after 60 s with the text of the page that is there instead.
    pub async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(el) => match el.text().await {
                    Ok(t) => return t,
                    // The page changed between finding and reading.
                    Err(e) if Instant::now() >= deadline => panic!("{css}: {e}"),
                    Err(_) => {}
                },
                Err(e) if Instant::now() >= deadline => {
                    let page = match self.client.find(Locator::Css("body")).await {
                        Ok(b) => b.text().await.unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    panic!("{css}: {e}\nthe page shows instead:\n{page}");
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether any element matches `css`.
    pub async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .is_empty()
    }

    /// The page's visible text.
    pub async fn body(&self) -> String {
        self.text("body").await
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// Polls `css`'s text until `pred` holds, or fails after `timeout`.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.client.find(Locator::Css(css)).await;
            if let Ok(el) = found {
                if let Ok(t) = el.text().await {
                    if pred(&t) {
                        return t;
                    }
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a screenshot as `name`.png under the target directory, and
    /// under docs/console/ when IMATTR_UPDATE_SCREENSHOTS is set.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")];
        if std::env::var_os("IMATTR_UPDATE_SCREENSHOTS").is_some() {
            dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console"));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}
