//! A real browser (headless Chromium over WebDriver) on a cold route with the waiting page: it
//! is shown the page, and ends on the machine's own page with no action.
//!
//! With `WAITING_PAGE_PNG=path`, the test also saves a screenshot of the page there (the one in
//! `docs/waiting-page.png` comes from it).

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use browser::Browser;
use common::*;

/// Whether `html` is the fake machine's answer (its JSON echo) to `GET path`, not the page.
fn is_machine_echo(html: &str, path: &str) -> bool {
    html.contains("\"uri\"") && html.contains(path) && !html.contains("data-phase")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_a_cold_route_ends_on_the_machine_s_page() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let backend = FakeBackend::new(Duration::from_millis(2500));
    let route = route(backend.clone())
        .name("notebook")
        .waiting_page(true)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    let url = format!("http://{addr}/app/notebook");

    browser.goto(&url).await;
    let page = browser.source().await;
    assert!(
        page.contains("data-phase"),
        "first the waiting page: {page}"
    );
    assert!(page.contains("notebook"), "{page}");
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");

    let machine = browser
        .wait_for_source(Duration::from_secs(60), |html| {
            is_machine_echo(html, "/app/notebook")
        })
        .await;
    assert!(
        machine.contains("text/html"),
        "the browser's Accept: {machine}"
    );
    assert_eq!(browser.url().await, url, "no redirect: the same address");
    assert_eq!(backend.starts(), 1);

    // Cold again, now with a past start to go by: the page shows how far along it is.
    handle.stop().await;
    browser.goto(&format!("{url}?again")).await;
    let bar = browser
        .find("progress[value]")
        .await
        .expect("a determinate progress bar");
    let value: f64 = bar.attr("value").await.unwrap().unwrap().parse().unwrap();
    assert!((0.0..100.0).contains(&value), "{value}");
    if let Ok(path) = std::env::var("WAITING_PAGE_PNG") {
        // Part-way through, as a person would see it.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        std::fs::write(&path, browser.screenshot().await).unwrap();
    }
    browser
        .wait_for_source(Duration::from_secs(60), |html| {
            is_machine_echo(html, "/app/notebook?again")
        })
        .await;
    assert_eq!(backend.starts(), 2);
    browser.close().await;
}

/// Serves the admin service for `layer` on 127.0.0.1:0.
async fn admin(layer: &vmproxy::VmProxyLayer) -> std::net::SocketAddr {
    let admin = vmproxy::admin::Admin::for_layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vmproxy::server::Server::new().serve(listener, admin, std::future::pending()));
    addr
}

/// The `data-state` of a machine's row on the status page.
async fn row_state(browser: &Browser, name: &str) -> Option<String> {
    let row = browser.find(&format!("#machine-{name}")).await?;
    row.attr("data-state").await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_follows_the_machine_live_and_its_buttons_work() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let backend = FakeBackend::new(Duration::from_millis(1500));
    let route = route(backend.clone()).name("notebook").build().unwrap();
    let handle = route.handle();
    let layer = vmproxy::VmProxyLayer::new(route);
    let addr = admin(&layer).await;
    browser.goto(&format!("http://{addr}/")).await;
    let mut state = None;
    for _ in 0..100 {
        state = row_state(&browser, "notebook").await;
        if state.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state.as_deref(), Some("absent"));
    // A mark on this document: a reload would lose it.
    browser
        .client()
        .execute("window.__notReloaded = true; return null;", vec![])
        .await
        .unwrap();

    // Started from outside the page: the row follows without a reload.
    handle.start().await.unwrap();
    let mut seen = String::new();
    for _ in 0..100 {
        seen = row_state(&browser, "notebook").await.unwrap_or_default();
        if seen == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "running", "the page did not follow the start");
    let kept = browser
        .client()
        .execute("return window.__notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(kept, serde_json::Value::Bool(true), "the page was reloaded");
    if let Ok(path) = std::env::var("STATUS_PAGE_PNG") {
        std::fs::write(&path, browser.screenshot().await).unwrap();
    }

    // Its stop button stops the machine.
    let stop = browser
        .find("#machine-notebook button[data-action=\"stop\"]")
        .await
        .expect("a stop button");
    stop.click().await.unwrap();
    eventually(Duration::from_secs(10), || {
        handle.state() == vmproxy::State::Absent
    })
    .await;
    let mut seen = String::new();
    for _ in 0..100 {
        seen = row_state(&browser, "notebook").await.unwrap_or_default();
        if seen == "absent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "absent");

    // The boot column: the learned start's median, and during the next start what is left.
    let boot = || async {
        let cell = browser
            .find("#machine-notebook td[data-field=\"boot\"]")
            .await?;
        cell.text().await.ok()
    };
    let learned = boot().await.unwrap_or_default();
    assert!(
        learned.ends_with(" s") && !learned.contains("left"),
        "{learned:?}"
    );
    let starting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.start().await }
    });
    let mut seen = String::new();
    for _ in 0..100 {
        seen = boot().await.unwrap_or_default();
        if seen.contains("left") || starting.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.contains(" left)"), "{seen:?}");
    starting.await.unwrap().unwrap();
    handle.stop().await;
    browser.close().await;
}
