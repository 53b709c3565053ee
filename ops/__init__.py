"""Operations: settings, logging, telemetry, the `inferq` CLI, the process launcher and the benchmark."""
