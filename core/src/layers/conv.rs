//! TODO(helper): conv
