//! Support for nash integration tests.
