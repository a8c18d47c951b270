"""Sign in with an API key (the session remembers it), sign out."""

from __future__ import annotations

from flask import g, redirect, render_template, request, url_for
from werkzeug import Response

from web.ui import auth, bp


@bp.get("/")
def home() -> Response:
    return redirect(url_for("ui.jobs"))


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> Response | tuple[str, int] | str:
    target = auth.safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.principal is not None:
            return redirect(target)
        return render_template("signin.html", next=target, error=None)
    key = request.form.get("api_key", "").strip()
    if key and auth.sign_in(key):
        return redirect(target)
    error = "That API key is unknown or revoked." if key else "Enter your API key."
    return render_template("signin.html", next=target, error=error), 401


@bp.post("/signout")
def signout() -> Response:
    auth.sign_out()
    return redirect(url_for("ui.signin"))
