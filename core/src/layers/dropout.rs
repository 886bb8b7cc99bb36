//! TODO(helper): dropout
