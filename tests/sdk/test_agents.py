"""Agent frameworks run their tool loop against chorus unmodified (CHORUS_URL): the OpenAI
Agents SDK on its Chat Completions model, and LangChain's ChatOpenAI with bind_tools. The
test provides the tool (a weather lookup); each loop must call it, feed the result back
and end with a text answer. The first turn requires a call: a 135M model would otherwise
rarely make one."""

import asyncio
import os

import pytest

BASE = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")
MODEL = "smollm2-135m-instruct"


def test_openai_agents_sdk_runs_a_tool_loop():
    from agents import OpenAIChatCompletionsModel, RunConfig, Runner, set_tracing_disabled
    from openai import AsyncOpenAI
    from weather_agent import weather_agent

    set_tracing_disabled(True)
    calls = []
    client = AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)
    agent = weather_agent(OpenAIChatCompletionsModel(model=MODEL, openai_client=client), calls)
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4,
                                    run_config=RunConfig(tracing_disabled=True)))
    assert calls, "the tool was never called"
    assert isinstance(result.final_output, str) and result.final_output.strip()


def test_langchain_chat_openai_runs_a_tool_loop():
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"It is sunny and 21 degrees in {city}."

    llm = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", temperature=0,
                     max_tokens=80, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert first.tool_calls, first
    assert not first.invalid_tool_calls
    messages.append(first)
    for call in first.tool_calls:
        assert call["name"] == "get_weather"
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather]).invoke(messages)
    # Auto on the second turn: the model may call again; then it is told to answer.
    if final.tool_calls:
        messages.append(final)
        for call in final.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
        final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and final.content.strip(), final
