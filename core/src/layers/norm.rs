//! TODO(helper): norm
