"""The portal's navigation: one table, each entry shown only to those allowed its action.

A new page adds one line here (its label, its path under the org or the platform admin, the action its
page guard requires); nothing else in the layout changes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ADMIN_NAV", "ORG_NAV", "NavItem"]


@dataclass(frozen=True, slots=True)
class NavItem:
    label: str
    path: str  # below /portal/orgs/{org_id} (org pages) or /portal/admin (platform pages)
    action: str  # the action of the page's guard


ORG_NAV = (
    NavItem("Dashboard", "", "org.read"),
    NavItem("API keys", "/keys", "keys.read"),
    NavItem("Budgets", "/budgets", "budgets.read"),
    NavItem("Request logs", "/logs", "usage.read"),
    NavItem("Usage", "/usage", "usage.read"),
    NavItem("Billing", "/billing", "billing.read"),
    NavItem("Members", "/members", "members.read"),
    NavItem("Webhooks", "/webhooks", "webhooks.read"),
    NavItem("Settings", "/settings", "org.read"),
)

ADMIN_NAV = (
    NavItem("Orgs", "/orgs", "platform.orgs.read"),
    NavItem("Pricing", "/pricing", "platform.catalogue.read"),
    NavItem("Supply chain", "/supply", "platform.catalogue.read"),
    NavItem("Model quality", "/quality", "platform.quality.read"),
    NavItem("Crypto review", "/crypto", "platform.payments.read"),
    NavItem("Audit log", "/audit", "platform.audit.read"),
    NavItem("Stripe", "/stripe", "platform.stripe.read"),
    NavItem("Mail", "/mail", "platform.mail.read"),
)
