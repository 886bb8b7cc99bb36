//! TODO(helper): adam
