"""End-to-end experiment pipelines built from resumable, content-addressed stages."""
