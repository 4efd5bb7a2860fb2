"""FleetLM operator: reconciles LLMDeployment resources into serving pods."""
