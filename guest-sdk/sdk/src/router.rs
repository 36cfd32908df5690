//! Routes requests to handlers by method and `{param}` path pattern, and lists them in the manifest.

use crate::abi::{self, Auth, Endpoint, Manifest, Mode};
use crate::http::{Error, Request, Response};

/// A request handler. Returning `Err` answers with the error's status and JSON body.
pub type Handler = fn(&Request) -> Result<Response, Error>;

struct Route {
    endpoint: Endpoint,
    handler: Handler,
}

/// The app's endpoints.
///
/// `get` routes are read-only and `post`/`put`/`patch`/`delete` are read-write; all of them
/// admit any member or user. Use [`Router::route`] to choose the mode and the audience.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new() -> Self {
        Router::default()
    }

    pub fn get(self, path: &str, handler: Handler) -> Self {
        self.route("GET", path, Mode::Readonly, Auth::Authenticated, handler)
    }

    pub fn post(self, path: &str, handler: Handler) -> Self {
        self.route("POST", path, Mode::Readwrite, Auth::Authenticated, handler)
    }

    pub fn put(self, path: &str, handler: Handler) -> Self {
        self.route("PUT", path, Mode::Readwrite, Auth::Authenticated, handler)
    }

    pub fn patch(self, path: &str, handler: Handler) -> Self {
        self.route("PATCH", path, Mode::Readwrite, Auth::Authenticated, handler)
    }

    pub fn delete(self, path: &str, handler: Handler) -> Self {
        self.route("DELETE", path, Mode::Readwrite, Auth::Authenticated, handler)
    }

    /// Adds an endpoint with an explicit mode and audience.
    pub fn route(mut self, method: &str, path: &str, mode: Mode, auth: Auth, handler: Handler) -> Self {
        let endpoint = Endpoint { method: method.to_ascii_uppercase(), path: path.to_owned(), mode, auth };
        self.routes.push(Route { endpoint, handler });
        self
    }

    /// The manifest the host uses to route and authorise requests.
    pub fn manifest(&self) -> Manifest {
        Manifest { abi: abi::ABI_VERSION, endpoints: self.routes.iter().map(|r| r.endpoint.clone()).collect() }
    }

    /// Runs the handler for a request.
    ///
    /// The host already matched the route and checked the caller's role; this looks the route up
    /// again (by the pattern the host names, or by matching the path) so native tests exercise the
    /// same dispatch as the wasm build.
    pub fn dispatch(&self, req: &Request) -> Response {
        let head = req.head();
        let route = self.routes.iter().find(|r| {
            r.endpoint.method == head.method
                && if head.route.is_empty() {
                    abi::match_path(&r.endpoint.path, &head.path).is_some()
                } else {
                    r.endpoint.path == head.route
                }
        });
        match route {
            Some(r) => (r.handler)(req).unwrap_or_else(Response::from),
            None => Error::not_found(format!("no endpoint {} {}", head.method, head.path)).into(),
        }
    }
}
