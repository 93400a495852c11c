// The server form's Authentication section: OAuth's fields only when OAuth 2.1 is chosen, the
// secret token's whenever it is not (typing a token is also how older habits choose it).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const choices = document.querySelectorAll('input[name="auth_kind"]');
  if (!choices.length) return;
  const oauthFields = ["oauth_grant", "oauth_client_id", "oauth_client_secret",
    "clear_oauth_client_secret", "oauth_scope", "oauth_issuer"];
  const tokenFields = ["secret_token", "clear_secret_token"];
  const show = (fields, visible) => fields.forEach((name) =>
    document.querySelectorAll(`.form-row.field-${name}, .fieldBox.field-${name}`)
      .forEach((row) => { row.style.display = visible ? "" : "none"; }));
  const update = () => {
    const chosen = document.querySelector('input[name="auth_kind"]:checked');
    const oauth = chosen !== null && chosen.value === "oauth";
    show(oauthFields, oauth);
    show(tokenFields, !oauth);
  };
  choices.forEach((choice) => choice.addEventListener("change", update));
  update();
});
