//! Support for nash integration tests: see [`support`].

pub mod support;
