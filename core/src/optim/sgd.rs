//! TODO(helper): sgd
