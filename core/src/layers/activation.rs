//! TODO(helper): activation
