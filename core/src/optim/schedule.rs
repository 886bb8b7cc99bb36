//! TODO(helper): schedule
