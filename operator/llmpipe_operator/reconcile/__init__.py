"""reconcile: observe -> plan -> render -> apply -> report, as numbered steps."""
