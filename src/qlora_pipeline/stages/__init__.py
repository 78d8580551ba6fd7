"""One module per DVC stage: read config and inputs, call the core, write outputs, talk to MLflow."""
