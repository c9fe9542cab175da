//! The console in a real browser (Debian's chromium through chromedriver)
//! against the real system: orders appear and finish live, a cancelled
//! order's diagram walks back in reverse, a garbled message shows up under
//! dead letters and Replay says why it still cannot be read, Cancel works
//! from the page. Each test saves a screenshot (the README's pictures).
use std::time::Duration;

use contracts::order::v1 as api;
use e2e::browser::{Browser, screenshot_path};
use e2e::{Console, Options, OrderStatus, SETTLE, System, system};

const WAIT: Duration = Duration::from_secs(30);

/// The system, its console and a browser; shipping is stopped when asked,
/// so an order waits where a test can watch it.
async fn setup(options: Options) -> (System, Console, Browser) {
    let sys = system(options).await;
    for sku in ["BOOK", "PEN"] {
        sys.set_stock(sku, 50).await.unwrap();
    }
    let console = sys.console(0).await.unwrap();
    let browser = Browser::start().await.unwrap();
    (sys, console, browser)
}

async fn kill(sys: &mut System, name: &str) {
    tokio::task::block_in_place(|| sys.service(name).kill()).unwrap();
}

async fn restart(sys: &mut System, name: &str) {
    sys.service(name).restart().unwrap();
}

/// The event types the order's swimlane draws, left to right.
async fn drawn_events(browser: &Browser, kind: Option<&str>) -> Vec<String> {
    let selector = match kind {
        Some(kind) => format!("svg.swimlane g.event.ev-{kind}"),
        None => "svg.swimlane g.event".to_owned(),
    };
    let script = format!(
        "return [...document.querySelectorAll('{selector}')]
            .sort((a, b) => a.dataset.position - b.dataset.position)
            .map(g => g.dataset.eventType)"
    );
    let value = browser.eval(&script).await.unwrap();
    serde_json::from_value(value).unwrap()
}

async fn no_console_errors(browser: &Browser) {
    let errors = browser.console_errors().await.unwrap();
    assert!(
        errors.is_empty(),
        "the browser console shows errors: {errors:#?}"
    );
}

async fn not_reloaded(browser: &Browser) -> bool {
    browser
        .eval("return window.notReloaded === true")
        .await
        .unwrap()
        == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_over_grpc_appears_and_completes_live_with_no_reload() {
    let (mut sys, console, browser) = setup(Options::default()).await;
    browser
        .goto(&format!("{}/orders", console.url))
        .await
        .unwrap();
    browser
        .wait_for_text("#orders", WAIT, |t| t.contains("No orders match"))
        .await
        .unwrap();
    browser.eval("window.notReloaded = true").await.unwrap();

    kill(&mut sys, "shipping").await;
    let placed = sys.place_one("BOOK").await.unwrap();
    let row = format!("tr[data-order-id=\"{}\"]", placed.order_id);
    let link = browser.find(&format!("{row} a"), WAIT).await.unwrap();
    assert!(
        not_reloaded(&browser).await,
        "the list reloaded to show the order"
    );

    browser.click(&link).await.unwrap();
    let page = format!("{}/orders/{}", console.url, placed.order_id);
    browser.find("#watch-state", WAIT).await.unwrap();
    assert_eq!(browser.current_url().await.unwrap(), page);
    let status = browser
        .wait_for_text("[data-field=status]", WAIT, |t| !t.is_empty())
        .await
        .unwrap();
    assert!(
        ["PENDING", "RESERVED"].contains(&status.as_str()),
        "{status}"
    );
    browser
        .wait_for_text("#watch-state", WAIT, |t| t == "live")
        .await
        .unwrap();
    browser.eval("window.notReloaded = true").await.unwrap();

    restart(&mut sys, "shipping").await;
    browser
        .wait_for_text("[data-field=status]", SETTLE, |t| t == "COMPLETED")
        .await
        .unwrap();
    assert!(not_reloaded(&browser).await, "the order page reloaded");
    browser
        .wait_for_text("[data-effect=notification]", WAIT, |t| {
            t.contains("CONFIRMATION SENT")
        })
        .await
        .unwrap();
    assert_eq!(
        drawn_events(&browser, None).await,
        [
            "order.created",
            "inventory.reserved",
            "shipping.scheduled",
            "notification.sent"
        ]
    );
    browser
        .find("svg.swimlane g.outcome[data-outcome=COMPLETED]", WAIT)
        .await
        .unwrap();
    let effects = browser.find("[data-effect=inventory]", WAIT).await.unwrap();
    assert!(browser.text(&effects).await.unwrap().contains("HELD"));
    browser
        .screenshot(&screenshot_path("order-completed"))
        .await
        .unwrap();

    // The list and the order are pages of their own: back and forward work.
    browser.back().await.unwrap();
    browser.find(&row, WAIT).await.unwrap();
    assert_eq!(
        browser.current_url().await.unwrap(),
        format!("{}/orders", console.url)
    );
    browser.forward().await.unwrap();
    browser
        .wait_for_text("[data-field=status]", WAIT, |t| t == "COMPLETED")
        .await
        .unwrap();
    assert_eq!(browser.current_url().await.unwrap(), page);

    // The health page counts it.
    browser
        .goto(&format!("{}/health", console.url))
        .await
        .unwrap();
    browser
        .wait_for_text(".counts .status-completed b", WAIT, |t| t == "1")
        .await
        .unwrap();
    browser
        .find("svg.chart polyline.completed", WAIT)
        .await
        .unwrap();
    browser
        .screenshot(&screenshot_path("health"))
        .await
        .unwrap();
    no_console_errors(&browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_orders_diagram_shows_compensation_in_reverse_order() {
    let (sys, console, browser) = setup(Options::default()).await;
    let placed = sys.place_one("BOOK").await.unwrap();
    sys.order
        .clone()
        .cancel_order(api::CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();
    let ended = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(ended.status(), OrderStatus::Cancelled);

    browser
        .goto(&format!("{}/orders/{}", console.url, placed.order_id))
        .await
        .unwrap();
    browser
        .wait_for_text("[data-field=status]", WAIT, |t| t == "CANCELLED")
        .await
        .unwrap();
    assert_eq!(
        drawn_events(&browser, Some("compensation")).await,
        [
            "order.cancelled",
            "notification.cancelled",
            "shipping.cancelled",
            "inventory.released"
        ],
        "compensations are drawn in their own colour, in the order they ran"
    );
    // Each compensation is drawn as caused by the one before it.
    let id = |ty: &str| {
        ended
            .timeline
            .iter()
            .find(|e| e.event_type == ty)
            .map(|e| e.event_id.clone())
            .unwrap_or_else(|| panic!("{ty} is not on the timeline"))
    };
    for (cause, effect) in [
        ("order.cancelled", "notification.cancelled"),
        ("notification.cancelled", "shipping.cancelled"),
        ("shipping.cancelled", "inventory.released"),
    ] {
        let arrow = format!(
            "svg.swimlane path.cause.compensation[data-from=\"{}\"][data-to=\"{}\"]",
            id(cause),
            id(effect)
        );
        browser.find(&arrow, WAIT).await.unwrap();
    }
    let reason = browser.find("[data-field=reason]", WAIT).await.unwrap();
    assert_eq!(
        browser.text(&reason).await.unwrap(),
        "customer: changed my mind"
    );
    browser
        .screenshot(&screenshot_path("order-cancelled"))
        .await
        .unwrap();

    // The choreography page draws the same chain from the declaration.
    browser
        .goto(&format!("{}/choreography", console.url))
        .await
        .unwrap();
    let chain = browser
        .eval(
            "return [...document.querySelectorAll('g.chain[data-chain=cancel] g.event')]
                .map(g => g.dataset.eventType)",
        )
        .await
        .unwrap();
    assert_eq!(
        chain,
        serde_json::json!([
            "order.cancelled",
            "notification.cancelled",
            "shipping.cancelled",
            "inventory.released"
        ])
    );
    browser
        .screenshot(&screenshot_path("choreography"))
        .await
        .unwrap();
    no_console_errors(&browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_message_shows_under_dead_letters_and_replay_says_why() {
    // With tokens, as in production: the console reads dead letters and
    // replays with the admin token.
    let (sys, console, browser) = setup(Options {
        extra_env: vec![
            ("CLIENT_TOKEN".into(), "console-client-token".into()),
            ("ADMIN_TOKEN".into(), "console-admin-token".into()),
        ],
        ..Options::default()
    })
    .await;
    let garbled = b"\x00\x01 this is no envelope \xff".to_vec();
    sys.publish_raw("order.created", garbled).await.unwrap();

    let list = format!("{}/dead-letters/inventory", console.url);
    let deadline = std::time::Instant::now() + WAIT;
    let row = loop {
        browser.goto(&list).await.unwrap();
        if let Some(row) = browser
            .find_all("tr[data-dead-letter]")
            .await
            .unwrap()
            .pop()
        {
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing parked in inventory"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let listed = browser.text(&row).await.unwrap();
    assert!(listed.contains("malformed message"), "{listed}");
    assert!(listed.contains("order.created"), "{listed}");
    let link = browser.find("tr[data-dead-letter] a", WAIT).await.unwrap();
    browser.click(&link).await.unwrap();
    let hex = browser.find("[data-field=hex]", WAIT).await.unwrap();
    assert!(
        browser
            .text(&hex)
            .await
            .unwrap()
            .contains("00 01 20 74 68 69 73"),
        "the raw bytes are shown as hex"
    );
    let decoded = browser.find("main", WAIT).await.unwrap();
    assert!(
        browser
            .text(&decoded)
            .await
            .unwrap()
            .contains("not an envelope")
    );

    let replay = browser.find("#replay button", WAIT).await.unwrap();
    browser.click(&replay).await.unwrap();
    let answer = browser
        .wait_for_text("#replay output", WAIT, |t| {
            t.contains("still cannot be read")
        })
        .await
        .unwrap();
    assert!(answer.contains("malformed message"), "{answer}");
    browser
        .screenshot(&screenshot_path("dead-letter"))
        .await
        .unwrap();
    no_console_errors(&browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_page_ends_the_order_cancelled() {
    let (mut sys, console, browser) = setup(Options::default()).await;
    kill(&mut sys, "shipping").await;
    let placed = sys.place_one("PEN").await.unwrap();
    browser
        .goto(&format!("{}/orders/{}", console.url, placed.order_id))
        .await
        .unwrap();
    browser
        .wait_for_text("#watch-state", WAIT, |t| t == "live")
        .await
        .unwrap();
    let reason = browser
        .find("#cancel input[name=reason]", WAIT)
        .await
        .unwrap();
    browser
        .type_into(&reason, "ordered by mistake")
        .await
        .unwrap();
    let button = browser.find("#cancel button", WAIT).await.unwrap();
    browser.click(&button).await.unwrap();
    let answer = browser
        .wait_for_text("#cancel output", WAIT, |t| t.contains("CANCELLING"))
        .await
        .unwrap();
    assert!(answer.contains("customer: ordered by mistake"), "{answer}");

    restart(&mut sys, "shipping").await;
    browser
        .wait_for_text("[data-field=status]", SETTLE, |t| t == "CANCELLED")
        .await
        .unwrap();
    let ended = sys.get(&placed.order_id).await.unwrap();
    assert_eq!(ended.status(), OrderStatus::Cancelled);
    assert_eq!(ended.reason, "customer: ordered by mistake");
    browser
        .wait_for_text("#watch-state", WAIT, |t| t == "the saga has ended")
        .await
        .unwrap();
    assert!(
        browser.find_all("#cancel").await.unwrap().is_empty(),
        "an ended order offers no Cancel"
    );
    browser
        .screenshot(&screenshot_path("cancel"))
        .await
        .unwrap();
    no_console_errors(&browser).await;
}

/// The status code and reason of a raw HTTP/1.0 request to the console.
async fn status_line(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let line = answer.lines().next().unwrap_or_default();
    line.split_once(' ').map_or("", |(_, rest)| rest).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_asks_for_its_password_and_takes_actions_from_its_own_pages_only() {
    use base64::Engine as _;
    let logs = tempfile::tempdir().unwrap();
    // Off loopback with no password it will not start, and says what to set.
    let port = harness::free_port();
    let mut open = harness::ServiceProcess::start(
        "console",
        vec![("CONSOLE_ADDR".into(), format!("0.0.0.0:{port}"))],
        logs.path().join("open.log"),
    )
    .unwrap();
    harness::eventually("the open console to refuse to start", WAIT, || {
        let running = open.is_running();
        async move { !running }
    })
    .await;
    let said = std::fs::read_to_string(logs.path().join("open.log")).unwrap();
    assert!(said.contains("set CONSOLE_PASSWORD"), "{said}");

    let port = harness::free_port();
    let _console = harness::ServiceProcess::start(
        "console",
        vec![
            ("CONSOLE_ADDR".into(), format!("127.0.0.1:{port}")),
            ("CONSOLE_PASSWORD".into(), "night-shift".into()),
        ],
        logs.path().join("console.log"),
    )
    .unwrap();
    harness::eventually("the console to listen", WAIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let basic = |password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("operator:{password}"))
    };
    let get = |host: &str, auth: &str| {
        format!("GET /orders HTTP/1.0\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\n\r\n")
    };
    assert_eq!(
        status_line(port, "GET /orders HTTP/1.0\r\nHost: localhost\r\n\r\n").await,
        "401 Unauthorized"
    );
    assert_eq!(
        status_line(port, &get("localhost", &basic("guess"))).await,
        "401 Unauthorized"
    );
    assert_eq!(
        status_line(
            port,
            &get(&format!("127.0.0.1:{port}"), &basic("night-shift"))
        )
        .await,
        "200 OK",
        "the right password opens the pages (the services being down is shown on them)"
    );
    // A name of someone else's pointing at 127.0.0.1 (DNS rebinding) is refused.
    assert_eq!(
        status_line(port, &get("evil.example", &basic("night-shift"))).await,
        "421 Misdirected Request"
    );
    // Actions come from the console's own pages: a form on another site can
    // send neither the console's header nor this origin.
    let post = |extra: &str| {
        let body = r#"{"sku":"BOOK","available":"1"}"#;
        format!(
            "POST /api/stock HTTP/1.0\r\nHost: localhost:{port}\r\nAuthorization: Basic {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            basic("night-shift"),
            body.len()
        )
    };
    assert_eq!(status_line(port, &post("")).await, "403 Forbidden");
    assert_eq!(
        status_line(
            port,
            &post("x-console-action: 1\r\nOrigin: http://evil.example\r\n")
        )
        .await,
        "403 Forbidden"
    );
    assert_eq!(
        status_line(
            port,
            &post(&format!(
                "x-console-action: 1\r\nOrigin: http://localhost:{port}\r\n"
            ))
        )
        .await,
        "200 OK",
        "from its own page the action is taken (and answers that inventory is unreachable)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_watch_stays_open_as_long_as_the_order_runs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sys = system(Options::default()).await;
    sys.set_stock("BOOK", 5).await.unwrap();
    kill(&mut sys, "shipping").await;
    let placed = sys.place_one("BOOK").await.unwrap();
    let console = sys.console(0).await.unwrap();
    let port: u16 = console.url.rsplit(':').next().unwrap().parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET /orders/{}/watch HTTP/1.1\r\nHost: localhost\r\n\r\n",
        placed.order_id
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Past the console's gRPC request timeout (10 s), the services' (30 s)
    // and two keep-alives (15 s): the watch is still open and has said
    // nothing but the order's changes.
    let mut seen = Vec::new();
    let reading = tokio::time::timeout(Duration::from_secs(35), async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the watch ended while the order runs");
            seen.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(reading.is_err(), "still reading when the time was up");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains(r#""status":"PENDING""#), "{seen}");
    assert!(!seen.contains("event: problem"), "{seen}");
    assert!(seen.matches("\n:").count() >= 2, "keep-alives: {seen}");
}
