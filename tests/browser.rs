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
