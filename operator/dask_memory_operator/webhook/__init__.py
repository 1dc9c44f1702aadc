"""The mutating admission webhook: every pod of a governed cluster is born governed."""
