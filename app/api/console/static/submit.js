// The submit form: show the prompt or the messages field, and the constraint field only for a
// response format that takes one.
"use strict";

(function () {
  const form = document.getElementById("submit-form");
  if (!form) return;
  const format = document.getElementById("f-format");
  const constraint = document.getElementById("constraint-field");

  function update() {
    const kind = form.querySelector("input[name=kind]:checked").value;
    for (const field of form.querySelectorAll("[data-kind]")) field.hidden = field.dataset.kind !== kind;
    constraint.hidden = ["text", "json_object"].includes(format.value);
  }

  form.addEventListener("change", update);
  update();
})();
