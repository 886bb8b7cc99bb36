//! TODO(helper): reshape
