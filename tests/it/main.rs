//! Integration tests: the real server on `127.0.0.1:0` against the in-process sandbox. One test
//! binary with modules, so the whole stack is linked once.

mod alerts;
mod auth;
mod child;
mod crash;
mod customers;
mod events;
mod feedback;
mod foundation;
mod insights;
mod owners;
mod postgres;
mod replicas;
mod rules;
mod scaleout_budget;
mod scaleout_failover;
mod scaleout_poller;
mod scaleout_replicas;
mod scaleout_surveys;
mod segment;
mod support;
mod surveys;
mod telemetry;
mod upstream;
