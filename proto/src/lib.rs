//! Cloister's gRPC services, generated from `cloister/*.proto` at build time with protox (no
//! `protoc` binary needed).
//!
//! - `app::v1::App`: a generic call to any app endpoint, with the same semantics as REST.
//! - `reconcile::v1::Reconcile`: the reconcile app's endpoints as typed calls (the node serves
//!   `reconcile::bounded`'s, which keeps an ingest's records encoded).
//! - `gov::v1::Gov`: governance: signed writes and reads of the `gov.*` tables.
//! - `peer::v1::Peer`: node-to-node traffic (Raft, forwarding, joins), on the peer port.

pub mod app {
    pub mod v1 {
        tonic::include_proto!("cloister.app.v1");
    }
}

pub mod reconcile {
    pub mod v1 {
        tonic::include_proto!("cloister.reconcile.v1");
    }

    /// The `Reconcile` server that decodes `IngestRequest` as [`EncodedRecords`]: what the node
    /// serves. The messages are `v1`'s.
    pub mod bounded {
        include!(concat!(env!("OUT_DIR"), "/bounded/cloister.reconcile.v1.rs"));
    }

    pub use crate::encoded_records::{EncodedRecords, RecordError, fields};
}

mod encoded_records;

pub mod gov {
    pub mod v1 {
        tonic::include_proto!("cloister.gov.v1");
    }
}

pub mod peer {
    // A `ForwardCall` is a request or a cancel; one is built per forwarded call, so the size of
    // the request variant costs nothing worth a box.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("cloister.peer.v1");
    }
}

/// The HTTP header (REST) and metadata key (gRPC) that carries a write's transaction id,
/// `term.seqno`.
pub const TX_ID_HEADER: &str = "x-cloister-tx-id";

/// The encoded descriptor set of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cloister_descriptor");
