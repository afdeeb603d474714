//! The waiting page: a browser that finds its machine not running is answered at once with a
//! page that starts the machine and reloads itself; every other client waits as before.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::binary::{check, Proxy, TempFile};
use common::*;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, State};

/// What Chromium sends when it navigates.
const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";

/// Sends `method path` with `Accept: accept` (none if empty); returns status, headers, body.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    accept: &str,
) -> (StatusCode, HeaderMap, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "front.test");
    if !accept.is_empty() {
        req = req.header("accept", accept);
    }
    let req = req.body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let res = send(addr, req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn browse(addr: std::net::SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    request(addr, "GET", path, BROWSER).await
}

fn paged(backend: FakeBackend) -> vmproxy::RouteBuilder {
    route(backend).waiting_page(true)
}

/// `Retry-After` in seconds.
fn retry_after(headers: &HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

/// The `content` of the page's `<meta http-equiv="refresh">`.
fn refresh(page: &str) -> u64 {
    let rest = page
        .split("http-equiv=\"refresh\" content=\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no refresh in {page}"));
    rest.split('"').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_browser_gets_the_page_at_once_and_the_machine_starts_for_it() {
    // A boot far longer than this test: the page cannot have waited for it.
    let backend = FakeBackend::new(Duration::from_secs(3600));
    let route = paged(backend.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (status, headers, page) = browse(addr, "/app/notebook").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["vary"], "Accept");
    assert!(retry_after(&headers) >= 1);
    assert_eq!(refresh(&page), retry_after(&headers));
    assert!(page.contains("<h1>fake</h1>"), "{page}");
    assert!(
        page.contains("<progress>"),
        "no past start: an indeterminate bar: {page}"
    );
    assert!(
        !page.contains("<script"),
        "works without JavaScript: {page}"
    );

    // The start runs with nobody waiting for it.
    eventually(Duration::from_secs(10), || backend.starts() == 1).await;
    assert_eq!(handle.state(), State::Creating);
    assert_eq!(handle.pending(), 0, "the page parks no request");
    let (_, _, again) = browse(addr, "/app/notebook").await;
    assert!(again.contains("Creating and booting"), "{again}");
    assert_eq!(backend.starts(), 1, "reloads join the start in flight");
}

#[tokio::test]
async fn once_it_runs_the_browser_gets_the_machine() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = paged(backend.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (status, _, _) = browse(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let mut rx = handle.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| matches!(s, State::Running(_))),
    )
    .await
    .expect("the page's start completes")
    .unwrap();
    let (status, headers, body) = browse(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["uri"], "/app/x");
    assert_eq!(header(&echo, "accept"), [BROWSER]);
    assert!(
        headers.get("server-timing").is_none(),
        "it did not wait for a start"
    );
    assert_eq!(backend.starts(), 1);

    // A later past start gives the next page an estimate.
    handle.stop().await;
    let (_, _, page) = browse(addr, "/app/x").await;
    assert!(page.contains("<progress max=\"100\" value="), "{page}");
    assert!(page.contains("to go"), "{page}");
}

#[tokio::test]
async fn clients_that_do_not_prefer_html_wait_as_before() {
    for accept in [
        "",
        "*/*",
        "application/json",
        "text/html;q=0.1, application/json",
        "image/webp,*/*;q=0.8",
    ] {
        let backend = FakeBackend::new(Duration::from_millis(100));
        let addr = front(paged(backend.clone()).build().unwrap()).await;
        let (status, headers, body) = request(addr, "GET", "/app/api", accept).await;
        assert_eq!(status, StatusCode::OK, "Accept {accept:?}: {body}");
        assert!(
            headers.get("server-timing").is_some(),
            "Accept {accept:?}: answered by the machine after waiting for its start"
        );
        serde_json::from_str::<serde_json::Value>(&body).unwrap();
    }
    // A form's POST waits too: a page that reloads would turn it into a GET.
    let backend = FakeBackend::new(Duration::from_millis(100));
    let addr = front(paged(backend.clone()).build().unwrap()).await;
    let (status, _, body) = request(addr, "POST", "/app/form", BROWSER).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_page_is_off_unless_asked_for() {
    let backend = FakeBackend::new(Duration::from_millis(100));
    let addr = front(route(backend).build().unwrap()).await;
    let (status, _, body) = browse(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn head_gets_the_headers_and_no_body() {
    let backend = FakeBackend::new(Duration::from_secs(3600));
    let addr = front(paged(backend.clone()).build().unwrap()).await;
    let (status, headers, body) = request(addr, "HEAD", "/app/x", BROWSER).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "");
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["vary"], "Accept");
    assert!(retry_after(&headers) >= 1);
    let len: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
    assert!(len > 200, "the length a GET would get: {len}");
    eventually(Duration::from_secs(10), || backend.starts() == 1).await;
}

/// A machine whose start always fails with markup in its reason.
struct Hostile;

impl Backend for Hostile {
    fn name(&self) -> &str {
        "hostile"
    }

    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async { Err("<img src=x onerror=alert(1)> & \"quota\"".into()) })
    }

    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async { Ok(Status::Gone) })
    }
}

/// Waits until a start has failed and the back-off begun (the error is recorded a little
/// earlier, before the cleanup after the failed start).
async fn failed(handle: &vmproxy::Handle) {
    eventually(Duration::from_secs(10), || {
        let status = handle.status();
        status.state == State::Absent && status.last_error.is_some()
    })
    .await;
}

#[tokio::test]
async fn names_and_errors_are_escaped() {
    let route = Route::builder("/app", Hostile)
        .name("<script>alert(\"x\")</script>")
        .waiting_page(true)
        .start_backoff(Duration::from_secs(30), Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    let (_, _, page) = browse(addr, "/app/").await;
    assert!(
        page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
    failed(&handle).await;
    let (_, _, page) = browse(addr, "/app/").await;
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quota&quot;"),
        "{page}"
    );
    assert!(!page.contains("<img"), "{page}");
}

#[tokio::test]
async fn a_failed_start_shows_the_reason_and_reloads_after_the_back_off() {
    let backend = FakeBackend::new(Duration::from_millis(20));
    backend.knobs.fail_starts.store(1, Ordering::SeqCst);
    let route = paged(backend.clone())
        .start_backoff(Duration::from_secs(5), Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    let (status, _, _) = browse(addr, "/app/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    failed(&handle).await;

    let (status, headers, page) = browse(addr, "/app/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.contains("zone us-test1-a has no capacity (injected)"),
        "{page}"
    );
    assert!(page.contains("data-phase=\"failed\""), "{page}");
    let after = retry_after(&headers);
    assert!((1..=5).contains(&after), "the back-off's rest: {after}");
    assert_eq!(refresh(&page), after, "reloads when the back-off is over");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(backend.starts(), 1, "no start during the back-off");

    // HEAD during the back-off: the same, without a body.
    let (status, headers, body) = request(addr, "HEAD", "/app/", BROWSER).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "")
    );
    assert!(retry_after(&headers) >= 1);
}

#[tokio::test]
async fn a_custom_template_is_used() {
    let backend = FakeBackend::new(Duration::from_secs(3600));
    let route = paged(backend)
        .name("lab & co")
        .waiting_page_template(
            "<p>{{machine}}|{{refresh_seconds}}|{{#error}}E{{/error}}{{^progress}}?{{/progress}}</p>",
        )
        .build()
        .unwrap();
    let addr = front(route).await;
    let (status, headers, page) = browse(addr, "/app/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page, "<p>lab &amp; co|1|?</p>");
    assert_eq!(retry_after(&headers), 1);

    let err = route_with_template("<p>{{#error}}</p>").unwrap_err();
    assert_eq!(err.field(), "waiting_page_template");
    assert!(err.reason().contains("never closed"), "{err}");
}

fn route_with_template(t: &str) -> Result<Route, vmproxy::ConfigError> {
    paged(FakeBackend::default())
        .waiting_page_template(t)
        .build()
}

#[tokio::test]
async fn a_page_during_a_stop_brings_the_machine_back() {
    let backend = FakeBackend::with(Knobs {
        boot: Duration::from_millis(50),
        stop_delay: Duration::from_millis(1500),
        ..Knobs::default()
    });
    let route = paged(backend.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    handle.start().await.unwrap();
    let stopper = tokio::spawn({
        let handle = handle.clone();
        async move { handle.stop().await }
    });
    eventually(Duration::from_secs(10), || {
        handle.state() == State::Stopping
    })
    .await;
    let (status, _, page) = browse(addr, "/app/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.contains("data-phase=\"stopping\""), "{page}");
    stopper.await.unwrap();
    // Started again once stopped, though no request waits for it.
    eventually(Duration::from_secs(10), || backend.starts() == 2).await;
    eventually(Duration::from_secs(10), || {
        matches!(handle.state(), State::Running(_))
    })
    .await;
    assert_eq!(backend.stops(), 1);
}

const BINARY_CONFIG: &str = r#"
listen = "127.0.0.1:0"

[[route]]
path = "/app"
strip_prefix = true
health_path = "/"
waiting_page = true
waiting_page_template = "TEMPLATE"

[route.process]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
"#;

#[test]
fn a_missing_template_file_is_a_config_error_naming_the_key() {
    let config = BINARY_CONFIG.replace("TEMPLATE", "/no/such/waiting.html");
    let (code, stderr) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("route[0].waiting_page_template"),
        "{stderr}"
    );
    assert!(stderr.contains("/no/such/waiting.html"), "{stderr}");

    let bad = TempFile::new("<h1>{{machine}}</h1>\n{{progres}}");
    let config = BINARY_CONFIG.replace("TEMPLATE", bad.path().to_str().unwrap());
    let (code, stderr) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("route[0].waiting_page_template") && stderr.contains("line 2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_binary_serves_the_file_s_template() {
    let template = TempFile::new(
        "<!doctype html><meta http-equiv=\"refresh\" content=\"{{refresh_seconds}}\"><h1>{{machine}}: {{phase}}</h1>",
    );
    let config = BINARY_CONFIG.replace("TEMPLATE", template.path().to_str().unwrap());
    let proxy = Proxy::start(&config, &[]);
    let (status, _, page) = browse(proxy.addr, "/app/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", proxy.log());
    assert!(page.starts_with("<!doctype html><meta"), "{page}");
    assert!(page.contains("<h1>python3: "), "{page}");
    // Reloading as a browser would, it ends on the machine's own page.
    let mut last = String::new();
    for _ in 0..300 {
        let (status, _, body) = browse(proxy.addr, "/app/").await;
        if status == StatusCode::OK {
            assert!(body.contains("Directory listing"), "{body}");
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("still the page after 30 s: {last}\n{}", proxy.log());
}
