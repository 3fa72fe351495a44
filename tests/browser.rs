//! The demo page in a real headless Chromium, driven through WebDriver
//! (chromedriver): create, edit and delete an invoice and watch the total
//! follow, pushed over Server-Sent Events; an invoice named like a script
//! stays text. Saves screenshots under `target/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test`
//! installs them when missing).

mod common;
#[path = "support/web.rs"]
mod web;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Spawned, TestEnv};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use web::start_server;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port, killed when dropped.
fn start_chromedriver() -> (Spawned, u16) {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists(),
        "{CHROMEDRIVER} is missing: apt-get install -y chromium chromium-driver (scripts/test does)"
    );
    let port = free_port();
    let child = Spawned(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

async fn browser(port: u16) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860", "--hide-scrollbars"]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session in headless Chromium")
}

async fn text(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the element's text is `wanted`; returns how long it took.
async fn wait_text(client: &Client, css: &str, wanted: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now = text(client, css).await;
        if now == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{css} shows {now:?}, not {wanted:?}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn fill(client: &Client, css: &str, value: &str) {
    let input = client.find(Locator::Css(css)).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

async fn add_invoice(client: &Client, name: &str, customer: &str, total: &str) {
    fill(client, "#name", name).await;
    fill(client, "#customer", customer).await;
    fill(client, "#amount", total).await;
    client
        .find(Locator::Css("#save"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_edits_invoices_and_the_total_follows() {
    let env = TestEnv::new("", "").await;
    let server = start_server(&[
        "demo",
        "--source",
        &env.source_url,
        "--target",
        &env.target_url,
        "--listen",
        "127.0.0.1:0",
    ]);
    let (_driver, port) = start_chromedriver();
    let client = browser(port).await;
    let result = run(&client, server.addr).await;
    let _ = client.close().await;
    result.unwrap();
}

async fn run(
    client: &Client,
    addr: std::net::SocketAddr,
) -> Result<(), fantoccini::error::CmdError> {
    client.goto(&format!("http://{addr}/")).await?;
    wait_text(client, "#connection", "live", Duration::from_secs(10)).await;
    wait_text(client, "#total", "0", Duration::from_secs(5)).await;

    // Create 10: the total follows within a second.
    add_invoice(client, "first", "1", "10").await;
    let took = wait_text(client, "#total", "10", Duration::from_secs(1)).await;
    eprintln!(
        "create: the total showed 10 {} ms after the click",
        took.as_millis()
    );
    wait_text(
        client,
        "#invoices li .inv-name",
        "first",
        Duration::from_secs(2),
    )
    .await;

    // Edit it to 25.
    client
        .find(Locator::Css("#invoices li .edit"))
        .await?
        .click()
        .await?;
    fill(client, "#amount", "25").await;
    client.find(Locator::Css("#save")).await?.click().await?;
    let took = wait_text(client, "#total", "25", Duration::from_secs(1)).await;
    eprintln!(
        "edit: the total showed 25 {} ms after the click",
        took.as_millis()
    );

    // The per-customer view below follows too.
    wait_text(
        client,
        "table[data-view=\"customer_totals\"] tbody tr td:nth-child(2)",
        "25",
        Duration::from_secs(2),
    )
    .await;

    // Delete it: back to 0 (SUM over no rows).
    client
        .find(Locator::Css("#invoices li .delete"))
        .await?
        .click()
        .await?;
    let took = wait_text(client, "#total", "0", Duration::from_secs(1)).await;
    eprintln!(
        "delete: the total showed 0 {} ms after the click",
        took.as_millis()
    );

    // Names are text, never markup.
    let script = "<script>alert(1)</script>";
    let image = "<img src=x onerror=\"window.__pwned=1\">";
    add_invoice(client, script, "2", "5").await;
    wait_text(
        client,
        "#invoices li .inv-name",
        script,
        Duration::from_secs(2),
    )
    .await;
    add_invoice(client, image, "3", "1").await;
    wait_text(client, "#total", "6", Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let names: Vec<String> = {
        let mut out = Vec::new();
        for element in client
            .find_all(Locator::Css("#invoices li .inv-name"))
            .await?
        {
            out.push(element.text().await?);
        }
        out
    };
    assert!(names.contains(&script.to_string()), "{names:?}");
    assert!(names.contains(&image.to_string()), "{names:?}");
    assert!(client.get_alert_text().await.is_err(), "an alert opened");
    let injected = client
        .execute(
            "return [document.querySelectorAll('#invoices script, #invoices img').length, typeof window.__pwned];",
            vec![],
        )
        .await?;
    assert_eq!(
        injected,
        json!([0, "undefined"]),
        "markup from data was run"
    );

    // Verify from the page.
    client.find(Locator::Css("#verify")).await?.click().await?;
    let started = Instant::now();
    loop {
        let report = text(client, "#verify-result").await;
        if report.contains("all 2 views equal") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "verify shows {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A few more invoices for the screenshots, then chaos on.
    for (name, customer, total) in [
        ("Acme order 1041", "1", "120.00"),
        ("Globex renewal", "2", "89.90"),
        ("Initech support", "1", "45.50"),
    ] {
        add_invoice(client, name, customer, total).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_text(client, "#total", "261.4", Duration::from_secs(3)).await;
    client.find(Locator::Css("#chaos")).await?.click().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shot = client.screenshot().await?;
    std::fs::write(screenshot_path("demo-screenshot.png"), &shot).unwrap();
    client.set_window_size(390, 844).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let phone = client.screenshot().await?;
    std::fs::write(screenshot_path("demo-screenshot-phone.png"), &phone).unwrap();
    // Nothing wider than a phone's screen.
    let overflow = client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await?;
    assert_eq!(
        overflow,
        json!(true),
        "the page scrolls sideways on a phone"
    );
    Ok(())
}
