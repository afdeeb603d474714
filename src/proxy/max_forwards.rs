//! `Max-Forwards` on OPTIONS and TRACE (RFC 9110 §7.6.2): at 0 the proxy is the final recipient
//! and answers itself — without waking the machine — otherwise it decrements the count.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

/// Fields never reflected by TRACE: credentials a client may not want echoed (RFC 9110 §9.3.8).
const NOT_REFLECTED: [header::HeaderName; 4] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
];

/// The methods a route forwards (all but CONNECT).
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// Applies `Max-Forwards` to a request; returns the answer when this hop is the last one.
pub(crate) fn apply<B>(req: &mut http::Request<B>) -> Option<Response<Bytes>> {
    if req.method() != Method::OPTIONS && req.method() != Method::TRACE {
        return None;
    }
    let value = req.headers().get(header::MAX_FORWARDS)?;
    let Some(n) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return None; // not a count: as if absent
    };
    if n > 0 {
        req.headers_mut()
            .insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
        return None;
    }
    let mut res = Response::new(Bytes::new());
    *res.status_mut() = StatusCode::OK;
    if req.method() == Method::OPTIONS {
        // RFC 9110 §9.3.7: what may be asked of the target — every method the proxy forwards.
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    }
    if req.method() == Method::TRACE {
        let mut echo = format!("TRACE {} {:?}\r\n", req.uri(), req.version());
        for (name, value) in req.headers() {
            if !NOT_REFLECTED.contains(name) {
                echo.push_str(name.as_str());
                echo.push_str(": ");
                echo.push_str(&String::from_utf8_lossy(value.as_bytes()));
                echo.push_str("\r\n");
            }
        }
        echo.push_str("\r\n");
        *res.body_mut() = Bytes::from(echo);
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("message/http"),
        );
    }
    Some(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, mf: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/app/x")
            .header("authorization", "Bearer secret");
        if let Some(v) = mf {
            b = b.header("max-forwards", v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn decrements_and_answers_at_zero() {
        let mut p = parts(Method::OPTIONS, Some("3"));
        assert!(apply(&mut p).is_none());
        assert_eq!(p.headers()["max-forwards"], "2");

        let mut p = parts(Method::OPTIONS, Some("0"));
        let res = apply(&mut p).expect("answered here");
        assert_eq!(res.status(), StatusCode::OK);

        let mut p = parts(Method::TRACE, Some("0"));
        let res = apply(&mut p).expect("answered here");
        assert_eq!(res.headers()["content-type"], "message/http");
        let body = String::from_utf8(res.body().to_vec()).unwrap();
        assert!(body.starts_with("TRACE /app/x HTTP/1.1\r\n"), "{body}");
        assert!(
            !body.contains("secret"),
            "credentials are not reflected: {body}"
        );
    }

    #[test]
    fn other_methods_and_bad_values_pass() {
        let mut p = parts(Method::GET, Some("0"));
        assert!(apply(&mut p).is_none());
        assert_eq!(p.headers()["max-forwards"], "0");
        let mut p = parts(Method::OPTIONS, Some("many"));
        assert!(apply(&mut p).is_none());
        let mut p = parts(Method::TRACE, None);
        assert!(apply(&mut p).is_none());
    }
}
