//! The embedded imageio-compatible data server (issue 3; not built yet).
