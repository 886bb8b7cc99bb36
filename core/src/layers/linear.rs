//! TODO(helper): linear
