//! TODO(helper): embedding
