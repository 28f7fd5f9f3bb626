//! gRPC client helpers.
