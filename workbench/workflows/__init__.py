"""End-to-end workflows that join the engine, the analysis and the runtime: ptq, qat."""
