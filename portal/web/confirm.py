"""Destructive actions ask first: a page naming the consequence, which posts the same form again with
``confirmed=yes``. It works without JavaScript; a form that already says ``confirmed=yes`` goes straight through (the
handler then writes its audit row as before).

    if not confirmed(form):
        return ask(request, form, title_key="users.disable_title", consequence_key="users.disable_consequence",
                   kw={"name": user.name}, back="/users/" + user.name)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from portal.web.views import render

FIELD = "confirmed"
_SKIP = frozenset({"csrf", FIELD})


def confirmed(form: Any) -> bool:
    """Did the form come from the confirmation page?"""
    return str(form.get(FIELD, "")) == "yes"


def ask(
    request: web.Request,
    form: Any,
    *,
    title_key: str,
    consequence_key: str,
    back: str,
    kw: dict[str, Any] | None = None,
    button_key: str = "confirm.go",
    phone: bool = False,
    **ctx: Any,
) -> web.Response:
    """The confirmation page for this request: the consequence in words, a button that repeats the request with
    ``confirmed=yes`` (the same fields), and a way back that changes nothing. ``phone``: the residents' layout
    (``ctx``: what else it shows, e.g. the signed-in ``resident``)."""
    fields = [(k, str(v)) for k, v in form.items() if k not in _SKIP and isinstance(v, str)]
    resp = render(
        request,
        "phone_confirm.html" if phone else "confirm.html",
        title_key=title_key,
        consequence_key=consequence_key,
        consequence_kw=kw or {},
        fields=fields,
        action=request.path_qs,
        back=back,
        button_key=button_key,
        **({"resident": None} | ctx),
    )
    resp.headers["Cache-Control"] = "no-store"
    return resp
