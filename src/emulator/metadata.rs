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

/// Every `/computeMetadata/v1/...` request.
pub(crate) fn handle(
    world: &Arc<World>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let path = uri.path().trim_start_matches("/computeMetadata/v1/");
    let name = match path {
        "instance/service-accounts/default/token" => "metadata.token",
        "instance/service-accounts/default/email" => "metadata.email",
        "project/project-id" => "metadata.projectId",
        "project/numeric-project-id" => "metadata.numericProjectId",
        "universe/universe-domain" => "metadata.universeDomain",
        _ => "metadata.unknown",
    };
    let res = respond(world, name, method, headers);
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

fn respond(world: &Arc<World>, name: &str, method: &Method, headers: &HeaderMap) -> Response {
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
    if method != Method::GET {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "Method not allowed\n".to_owned(),
        );
    }
    let project = &world.opts.project;
    match name {
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
        "metadata.email" => answer(
            StatusCode::OK,
            "application/text",
            format!("vmproxy@{project}.iam.gserviceaccount.com"),
        ),
        "metadata.projectId" => answer(StatusCode::OK, "application/text", project.clone()),
        "metadata.numericProjectId" => answer(
            StatusCode::OK,
            "application/text",
            "123456789012".to_owned(),
        ),
        "metadata.universeDomain" => answer(
            StatusCode::OK,
            "application/text",
            "googleapis.com".to_owned(),
        ),
        _ => answer(
            StatusCode::NOT_FOUND,
            "text/html; charset=UTF-8",
            "Not Found\n".to_owned(),
        ),
    }
}
