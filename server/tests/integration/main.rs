//! The server's HTTP integration tests, one module per subject, in one test binary:
//! each binary is a link of the whole server, and one takes minutes less to build than
//! thirteen. Every test takes a turn ([`common::alone`], [`common::together`]): those that
//! time streams or count the server's requests and connections run alone, the others
//! two at a time (the harness's threads on two cores).

mod common;

mod api;
mod call_grammars;
mod concurrency;
mod connections;
mod fuzz_validation;
mod grammar_failures;
mod hf_models;
mod hostile;
mod multiturn;
mod operations;
mod reasoning;
mod scheduler_view;
mod stalls;
