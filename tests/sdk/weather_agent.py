"""The weather agent both agent-loop tests run (on Chat Completions and on Responses):
a `get_weather` tool that records each city asked for, a first turn that must call it,
and text after it."""

import dataclasses

from agents import Agent, AgentHooks, ModelSettings, function_tool


class AnswerAfterTheTool(AgentHooks):
    """Once the tool has run, the model is to answer in text: left to choose, a 135M
    model calls again (the SDK's own reset would return to "auto")."""

    async def on_tool_end(self, context, agent, tool, result):
        agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")


def weather_agent(model, calls, output_type=None):
    """An agent on `model` whose tool appends each city it is asked for to `calls`;
    `output_type`: the type of its final answer (text by default)."""

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    return Agent(
        name="weather",
        instructions="Answer questions about the weather. Use get_weather.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", max_tokens=80, temperature=0),
        hooks=AnswerAfterTheTool(),
        reset_tool_choice=False,
        output_type=output_type,
    )
