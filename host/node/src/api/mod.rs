//! The node's frontends: REST (axum) and gRPC (tonic), both over TLS with client-certificate
//! identities, sharing one service layer so both have the same semantics.

pub mod error;
pub mod gov;
pub mod grpc;
mod openapi;
pub mod rest;
pub mod server;
pub mod service;
mod writer;

pub use error::ApiError;
pub use service::{AppCall, AppReply, NodeInfo, Service, ServiceForwarder, ServiceParts};
