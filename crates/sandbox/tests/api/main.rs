//! The sandbox served on 127.0.0.1:0 and called over HTTP, one module per area. A single test
//! binary keeps link time low.

mod admin;
mod faults;
mod rate_limit;
mod retainly;
mod retently;
mod support;
mod webhook;
