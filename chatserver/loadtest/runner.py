"""The coordinator: checks the servers, starts the shards and has a conductor walk them
through the scenario. The whole run is under one deadline.
"""

from __future__ import annotations

import asyncio

import aiohttp

from .auth import Tokens, check_token
from .client import os_reason
from .conductor import Conductor, Outcome
from .links import Events, Link, LocalLink, ProcessLink
from .plan import Plan, RunError
from .progress import Progress
from .storm import StormConductor


async def run(plan: Plan, progress: Progress) -> Outcome:
    """Run the plan; raise RunError with a one-line reason when it cannot finish."""
    await preflight(plan)
    events: Events = asyncio.Queue()
    links: list[Link] = []
    kind = StormConductor if plan.scenario == "storm" else Conductor
    conductor = kind(plan, links, events, progress)
    try:
        async with asyncio.timeout(plan.deadline):
            if plan.procs == 1:
                links.append(LocalLink(plan, 0, events))
            else:
                for number in range(plan.procs):
                    links.append(await ProcessLink.start(plan, number, events))
            return await conductor.run()
    except TimeoutError:
        raise RunError(f"deadline of {plan.deadline:g} s passed while {conductor.phase} "
                       "(raise --deadline, or lower the load)") from None
    finally:
        progress.clear()
        await asyncio.gather(*(link.stop() for link in links))


async def preflight(plan: Plan) -> None:
    """One request per URL, so a wrong URL or key fails at once with a clear reason."""
    timeout = plan.connect_timeout
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for target in plan.targets:
            url = target.base + "/healthz"
            try:
                async with asyncio.timeout(timeout), session.get(url) as response:
                    await response.read()  # any answer will do: a proxy may not route /healthz
            except TimeoutError:
                raise RunError(
                    f"cannot reach {target.base}: no answer within {timeout:g} s") from None
            except aiohttp.ClientConnectorError as exc:
                raise RunError(f"cannot reach {target.base}: {os_reason(exc.os_error)}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise RunError(f"cannot reach {target.base}: {exc}") from None
        if plan.private_key_pem is not None:
            token = Tokens(plan).mint(plan.username(-1))
            for target in plan.targets:
                await check_token(session, target, token)


