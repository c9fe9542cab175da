//! A real browser for the console's tests: Debian's chromium, driven over
//! the W3C WebDriver protocol through chromedriver (both from Debian's
//! packages; `.ci/run` installs them). The protocol is a few JSON calls over
//! HTTP, spoken here directly on loopback.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The key WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where chromium and chromedriver are, or why not.
fn program(env: &str, default: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var(env).map_or_else(|_| PathBuf::from(default), PathBuf::from);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) or set {env}",
        path.display()
    );
    Ok(path)
}

/// One headless chromium, in a profile of its own, with its chromedriver.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let chromium = program("CHROMIUM", "/usr/bin/chromium")?;
        let chromedriver = program("CHROMEDRIVER", "/usr/bin/chromedriver")?;
        let port = harness::free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.call("GET", "/status", None).await.is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "chromedriver did not start within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Headless, as root, with no network but loopback: the flags that
        // keep chromium from reaching out (and failing loudly) at start.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser
            .call(
                "POST",
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }}})),
            )
            .await?;
        browser.session = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no session id in {created}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; the answer's `value`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let exchange = self.exchange(method, path, body);
        let body = tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .map_err(|_| {
                anyhow::anyhow!("chromedriver did not answer {method} {path} within 60 s")
            })??;
        let answer: Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "chromedriver's answer to {method} {path}: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        let value = answer["value"].clone();
        if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!(
                "{method} {path}: {error}: {}",
                value["message"].as_str().unwrap_or("")
            );
        }
        Ok(value)
    }

    /// Sends one request and reads one answer's body (by its length, or
    /// its chunks: chromedriver keeps connections open).
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut stream = tokio::io::BufReader::new(stream);
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            anyhow::ensure!(
                stream.read_line(&mut line).await? > 0,
                "chromedriver closed the connection before answering"
            );
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(n) = lower.strip_prefix("content-length:") {
                length = n.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                stream.read_line(&mut size).await?;
                let size = usize::from_str_radix(size.trim(), 16)?;
                if size == 0 {
                    break;
                }
                let mut chunk = vec![0; size + 2];
                stream.read_exact(&mut chunk).await?;
                out.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = length {
            out.resize(length, 0);
            stream.read_exact(&mut out).await?;
        } else {
            stream.read_to_end(&mut out).await?;
        }
        Ok(out)
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self
            .call("GET", &self.at("/url"), None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn back(&self) -> anyhow::Result<()> {
        self.call("POST", &self.at("/back"), Some(json!({})))
            .await?;
        Ok(())
    }

    pub async fn forward(&self) -> anyhow::Result<()> {
        self.call("POST", &self.at("/forward"), Some(json!({})))
            .await?;
        Ok(())
    }

    /// Every element matching the CSS selector, in document order.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let found = self
            .call(
                "POST",
                &self.at("/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_owned())))
            .collect())
    }

    /// The first element matching `css`, waiting up to `timeout` for one.
    pub async fn find(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find_all(css).await?.into_iter().next() {
                return Ok(found);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no element {css:?} on {} within {timeout:?}",
                self.current_url().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn text(&self, element: &Element) -> anyhow::Result<String> {
        let value = self
            .call(
                "GET",
                &self.at(&format!("/element/{}/text", element.0)),
                None,
            )
            .await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    pub async fn attribute(&self, element: &Element, name: &str) -> anyhow::Result<String> {
        let value = self
            .call(
                "GET",
                &self.at(&format!("/element/{}/attribute/{name}", element.0)),
                None,
            )
            .await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    pub async fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.call(
            "POST",
            &self.at(&format!("/element/{}/click", element.0)),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    pub async fn type_into(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        self.call(
            "POST",
            &self.at(&format!("/element/{}/value", element.0)),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub async fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until the text of the first element matching `css` satisfies `wanted`.
    pub async fn wait_for_text(
        &self,
        css: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Some(element) = self.find_all(css).await?.into_iter().next() {
                // The element can be replaced between the lookup and the read.
                if let Ok(text) = self.text(&element).await {
                    if wanted(&text) {
                        return Ok(text);
                    }
                    last = text;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{css:?} did not show what was wanted within {timeout:?}; last it showed {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves what the browser shows as a PNG.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let value = self.call("GET", &self.at("/screenshot"), None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap_or_default())
            .context("the screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// What the pages wrote to the browser's console at level SEVERE
    /// (script errors, failed loads), since the last call.
    pub async fn console_errors(&self) -> anyhow::Result<Vec<String>> {
        let entries = self
            .call(
                "POST",
                &self.at("/se/log"),
                Some(json!({"type": "browser"})),
            )
            .await?;
        Ok(entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends chromium too; then chromedriver.
        let path = format!("/session/{}", self.session);
        let port = self.port;
        if !self.session.is_empty() {
            let _ = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                    s,
                    "DELETE {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
                // The answer comes once chromium has quit.
                let _ = s.read(&mut [0u8; 512]);
                Ok(())
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where a test keeps its screenshot: `SCREENSHOT_DIR` (the README's
/// pictures are made with `SCREENSHOT_DIR=docs/console`), else a folder
/// under the system's temporary one.
pub fn screenshot_path(name: &str) -> PathBuf {
    let dir = std::env::var("SCREENSHOT_DIR").map_or_else(
        |_| std::env::temp_dir().join("saga-console-screenshots"),
        PathBuf::from,
    );
    dir.join(format!("{name}.png"))
}
