//! sagactl, run as a person would, against the real services.
use std::process::Command;
use std::time::Duration;

use e2e::{Options, OrderStatus, System};

fn sagactl(sys: &System, args: &[&str]) -> (bool, String) {
    let addr = |i: usize| format!("http://127.0.0.1:{}", sys.ports[i]);
    let output = Command::new(harness::bin_dir().join("sagactl"))
        .args(["--order-addr", &addr(0), "--inventory-addr", &addr(1)])
        .args(["--shipping-addr", &addr(2), "--notification-addr", &addr(3)])
        .args(args)
        .output()
        .expect("sagactl runs (build the binaries first)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_can_drive_the_saga_from_the_command_line() {
    let sys = System::start(Options::default()).await.unwrap();
    let (ok, out) = sagactl(&sys, &["set-stock", "BOOK", "7"]);
    assert!(ok, "{out}");
    assert!(out.contains("BOOK: 7 available, 0 reserved"), "{out}");

    let (ok, out) = sagactl(
        &sys,
        &[
            "place",
            "--customer",
            "ada",
            "--destination",
            "de",
            "--contact",
            "ada@example.com",
            "--item",
            "BOOK=2",
            "--key",
            "cli-1",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.starts_with("placed (idempotency key cli-1)"), "{out}");
    let order_id = out
        .lines()
        .find_map(|l| l.strip_prefix("order       "))
        .expect("the order id is printed")
        .trim()
        .to_owned();
    let (ok, out) = sagactl(
        &sys,
        &[
            "place",
            "--customer",
            "ada",
            "--destination",
            "de",
            "--contact",
            "ada@example.com",
            "--item",
            "BOOK=2",
            "--key",
            "cli-1",
        ],
    );
    assert!(ok && out.starts_with("already placed"), "{out}");

    let (ok, out) = sagactl(&sys, &["watch", &order_id]);
    assert!(ok, "{out}");
    let statuses: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        statuses,
        ["PENDING", "RESERVED", "SCHEDULED", "COMPLETED"],
        "{out}"
    );

    let (ok, out) = sagactl(&sys, &["get", &order_id]);
    assert!(
        ok && out.contains("status      COMPLETED") && out.contains("notification.sent"),
        "{out}"
    );
    let (ok, out) = sagactl(&sys, &["effects", &order_id]);
    assert!(
        ok && out.contains("Held") && out.contains("Scheduled") && out.contains("Confirmation"),
        "{out}"
    );
    let (ok, out) = sagactl(&sys, &["list", "--status", "completed"]);
    assert!(ok && out.contains(&order_id), "{out}");
    let (ok, out) = sagactl(&sys, &["stock"]);
    assert!(
        ok && out.contains("BOOK")
            && out
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["BOOK", "5", "2"]),
        "{out}"
    );

    // Mistakes get the server's message, and a failing exit code.
    let (ok, out) = sagactl(
        &sys,
        &[
            "place",
            "--customer",
            "ada",
            "--destination",
            "DE",
            "--item",
            "BOOK=0",
        ],
    );
    assert!(!ok && out.contains("quantity 0 is out of range"), "{out}");
    let (ok, out) = sagactl(&sys, &["cancel", &order_id]);
    assert!(!ok && out.contains("already COMPLETED"), "{out}");
    let (ok, out) = sagactl(
        &sys,
        &[
            "health",
            "--addr",
            &format!("http://127.0.0.1:{}", sys.ports[0]),
        ],
    );
    assert!(ok && out.contains("SERVING"), "{out}");

    // A message nobody can read, on a subject inventory consumes, is parked
    // there and shown with its reason.
    sys.publish_raw("order.created", b"not protobuf at all".to_vec())
        .await
        .unwrap();
    let mut listed = String::new();
    for _ in 0..100 {
        let (ok, out) = sagactl(&sys, &["dead-letters", "inventory"]);
        assert!(ok, "{out}");
        if out.contains("order.created") {
            listed = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed.contains("malformed message"), "{listed}");
    let id = listed.split_whitespace().next().unwrap().to_owned();
    let (ok, out) = sagactl(&sys, &["replay", "inventory", &id]);
    assert!(!ok && out.contains("still cannot be read"), "{out}");
    let (ok, out) = sagactl(&sys, &["dead-letters", "inventory"]);
    assert!(ok && out.contains("(replayed 1 times)"), "{out}");
    let (ok, out) = sagactl(&sys, &["dead-letters", "billing"]);
    assert!(!ok && out.contains("no service \"billing\""), "{out}");
    assert_eq!(
        sys.wait_terminal(&order_id, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        OrderStatus::Completed
    );
}
