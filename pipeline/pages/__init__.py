"""Pages people read: the report's and compare's rendering and templates."""
