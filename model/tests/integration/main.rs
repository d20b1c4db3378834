//! chorus-model's tests on real and tiny models, in one test binary (each binary links
//! the whole crate and candle; one builds faster than four). The device path's tests
//! are a binary of their own (`tests/device.rs`): the CUDA build ships it to a GPU.

#[path = "../common/mod.rs"]
mod common;
#[path = "../tiny/mod.rs"]
mod tiny;

mod architectures;
mod batching;
mod fidelity;
mod gemma3;
