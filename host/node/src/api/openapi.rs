//! `/app/api`: an OpenAPI 3.1 document of the node's built-in endpoints and the app's endpoints,
//! built from the app's manifest on request.

use cloister_abi::abi::{Auth, Manifest, Mode};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, ObjectBuilder, OpenApiBuilder, PathItem, PathsBuilder, Required, ResponseBuilder, Type,
};

const BUILT_IN: &[(&str, &str)] = &[
    ("/node/health", "Whether the node is up."),
    ("/node/version", "The node's version and contract ABI."),
    ("/node/network", "The nodes of the network, their roles and the leader."),
    ("/app/api", "This document."),
];

fn method(m: &str) -> Option<HttpMethod> {
    Some(match m {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "DELETE" => HttpMethod::Delete,
        "PATCH" => HttpMethod::Patch,
        _ => return None,
    })
}

fn error_response() -> utoipa::openapi::Response {
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "error",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("code", ObjectBuilder::new().schema_type(Type::String))
                .property("message", ObjectBuilder::new().schema_type(Type::String))
                .required("code")
                .required("message"),
        )
        .required("error");
    ResponseBuilder::new()
        .description("An error, with a stable code and a message")
        .content("application/json", ContentBuilder::new().schema(Some(schema)).build())
        .build()
}

/// The document, as JSON.
pub fn document(manifest: Option<&Manifest>) -> serde_json::Value {
    let mut paths = PathsBuilder::new();
    for (path, summary) in BUILT_IN {
        let op = OperationBuilder::new()
            .summary(Some(*summary))
            .tag("node")
            .response("200", ResponseBuilder::new().description("OK"));
        paths = paths.path(*path, PathItem::new(HttpMethod::Get, op));
    }
    for e in manifest.map(|m| m.endpoints.as_slice()).unwrap_or_default() {
        let Some(http) = method(&e.method) else {
            continue;
        };
        let audience = match e.auth {
            Auth::Public => "anyone",
            Auth::Authenticated => "members and users",
            Auth::Members => "members",
            Auth::Users => "users",
        };
        let mode = match e.mode {
            Mode::Readonly => "read-only: runs on any node against committed state",
            Mode::Readwrite => "read-write: one committed transaction; the response carries x-cloister-tx-id",
        };
        let mut op = OperationBuilder::new()
            .summary(Some(format!("{} {}", e.method, e.path)))
            .description(Some(format!("For {audience}; {mode}.")))
            .tag("app")
            .response("200", ResponseBuilder::new().description("The app's answer"))
            .response("default", error_response());
        for segment in e.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
                );
            }
        }
        if e.mode == Mode::Readwrite {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", ContentBuilder::new().build())
                    .content("text/csv", ContentBuilder::new().build())
                    .build(),
            ));
        }
        paths = paths.path(format!("/app{}", e.path), PathItem::new(http, op));
    }
    let info = InfoBuilder::new()
        .title("Cloister node")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some("Every call is authenticated by its TLS client certificate."))
        .build();
    let doc = OpenApiBuilder::new().info(info).paths(paths.build()).build();
    serde_json::to_value(doc).expect("OpenAPI documents serialize")
}
