//! The metadata server subset: access tokens and the project id, only with
//! `Metadata-Flavor: Google`.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::json;

use super::state::World;
use super::Call;

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            ("metadata-flavor", "Google"),
            ("content-type", content_type),
        ],
        body,
    )
        .into_response()
}

fn query_has(uri: &Uri, name: &str, value: &str) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.split_once('=').unwrap_or((kv, "")) == (name, value))
    })
}

/// Every metadata-server request: `/` (what Google's clients ping) and `/computeMetadata/v1/...`.
pub(crate) fn handle(
    world: &Arc<World>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let email = service_account(world);
    let path = uri.path();
    let rest = path
        .strip_prefix("/computeMetadata/v1")
        .map(|r| r.trim_start_matches('/'));
    // The service account can be named `default` or by its email, as on the real server.
    let sa_path = |r: &str| -> Option<String> {
        let r = r.strip_prefix("instance/service-accounts/")?;
        let (who, what) = r.split_once('/').unwrap_or((r, ""));
        (who == "default" || who == email).then(|| what.to_owned())
    };
    let name = match rest {
        None if path == "/" || path.is_empty() => "metadata.root",
        None => "metadata.unknown",
        Some("") => "metadata.v1",
        Some("instance/service-accounts") | Some("instance/service-accounts/") => {
            "metadata.serviceAccounts"
        }
        Some(r) => match sa_path(r).as_deref() {
            Some("token") => "metadata.token",
            Some("email") => "metadata.email",
            Some("scopes") => "metadata.scopes",
            Some("aliases") => "metadata.aliases",
            Some("") => "metadata.serviceAccount",
            Some(_) => "metadata.unknown",
            None => match r {
                "instance" | "instance/" => "metadata.instance",
                "project" | "project/" => "metadata.project",
                "project/project-id" => "metadata.projectId",
                "project/numeric-project-id" => "metadata.numericProjectId",
                "universe/universe-domain" => "metadata.universeDomain",
                _ => "metadata.unknown",
            },
        },
    };
    let res = respond(world, name, method, uri, headers);
    world.lock().calls.push(Call {
        method: name.to_owned(),
        http_method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        status: res.status().as_u16(),
    });
    res
}

fn service_account(world: &World) -> String {
    format!("vmproxy@{}.iam.gserviceaccount.com", world.opts.project)
}

const TEXT: &str = "text/plain; charset=utf-8";
const SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

fn respond(
    world: &Arc<World>,
    name: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "Method not allowed\n".to_owned(),
        );
    }
    if name == "metadata.root" {
        // The server's root answers without the header: Google's clients GET it, with the
        // header, to detect the metadata server by the `Metadata-Flavor: Google` answer.
        return answer(StatusCode::OK, TEXT, "computeMetadata/\n".to_owned());
    }
    // Like the real one: no flavor header (or a forwarded request) → 403.
    let flavored = headers
        .get("metadata-flavor")
        .is_some_and(|v| v == "Google");
    if !flavored || headers.contains_key("x-forwarded-for") {
        return answer(
            StatusCode::FORBIDDEN,
            "text/html; charset=UTF-8",
            "Missing required header: Metadata-Flavor\n".to_owned(),
        );
    }
    let project = &world.opts.project;
    let email = service_account(world);
    let recursive = query_has(uri, "recursive", "true");
    match name {
        "metadata.v1" => answer(StatusCode::OK, TEXT, "instance/\nproject/\n".to_owned()),
        // Directories (Node's gcp-metadata probes `instance` to find the server).
        "metadata.instance" => answer(StatusCode::OK, TEXT, "service-accounts/\n".to_owned()),
        "metadata.project" => answer(
            StatusCode::OK,
            TEXT,
            "numeric-project-id\nproject-id\n".to_owned(),
        ),
        "metadata.serviceAccounts" if recursive => answer(
            StatusCode::OK,
            "application/json",
            json!({
                "default": { "aliases": ["default"], "email": email, "scopes": SCOPES },
                email.clone(): { "aliases": ["default"], "email": email, "scopes": SCOPES },
            })
            .to_string(),
        ),
        "metadata.serviceAccounts" => answer(StatusCode::OK, TEXT, format!("default/\n{email}/\n")),
        "metadata.serviceAccount" if recursive => answer(
            StatusCode::OK,
            "application/json",
            json!({ "aliases": ["default"], "email": email, "scopes": SCOPES }).to_string(),
        ),
        "metadata.serviceAccount" => answer(
            StatusCode::OK,
            TEXT,
            "aliases\nemail\nidentity\nscopes\ntoken\n".to_owned(),
        ),
        "metadata.token" => {
            let token = format!("ya29.emulator-{}", uuid::Uuid::new_v4().simple());
            world.lock().tokens.insert(token.clone());
            let body = json!({
                "access_token": token,
                "expires_in": world.opts.token_lifetime.as_secs(),
                "token_type": "Bearer",
            });
            answer(StatusCode::OK, "application/json", body.to_string())
        }
        "metadata.email" => answer(StatusCode::OK, TEXT, email),
        "metadata.scopes" => answer(StatusCode::OK, TEXT, format!("{}\n", SCOPES.join("\n"))),
        "metadata.aliases" => answer(StatusCode::OK, TEXT, "default\n".to_owned()),
        "metadata.projectId" => answer(StatusCode::OK, TEXT, project.clone()),
        "metadata.numericProjectId" => answer(StatusCode::OK, TEXT, "123456789012".to_owned()),
        "metadata.universeDomain" => answer(StatusCode::OK, TEXT, "googleapis.com".to_owned()),
        _ => answer(
            StatusCode::NOT_FOUND,
            "text/html; charset=UTF-8",
            "Not Found\n".to_owned(),
        ),
    }
}
