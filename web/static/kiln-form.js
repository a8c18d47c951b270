// Job forms, made to follow their choices. The page works without this script: every
// architecture's parameters are on it (the others' in a closed group), every model's
// versions are in the version list (grouped by model), and the rows hint names the
// features of the version the form was opened with. With it:
//  - only the chosen architecture's parameters are shown, and switching moves them;
//  - the version list offers only the chosen model's versions;
//  - the rows hint, the example placeholder and "Fill in an example row" follow the
//    chosen model and version (from the JSON the page carries in #model-hints).
(function () {
  "use strict";
  var form = document.querySelector("form.form");
  if (!form) return;

  // --- the chosen union member's fields (TrainSpec.arch_params by arch) ---------------
  var variantGroup = form.querySelector('[data-group="variant"]');
  var othersGroup = form.querySelector('[data-group="other-variants"]');
  var variantFields = Array.prototype.slice.call(form.querySelectorAll("[data-variant-values]"));
  if (variantGroup && variantFields.length) {
    var selector = form.querySelector('[name="' + variantFields[0].dataset.selector + '"]');
    var shown = variantGroup.querySelector(".form-grid");
    var none = variantGroup.querySelector("[data-none]");
    var tucked = othersGroup ? othersGroup.querySelector(".form-grid") : null;
    var showChosen = function () {
      var chosen = selector.value;
      var count = 0;
      variantFields.forEach(function (field) {
        var mine = field.dataset.variantValues.split(" ").indexOf(chosen) >= 0;
        if (mine) { shown.appendChild(field); count += 1; }
        else if (tucked) tucked.appendChild(field);
      });
      if (none) none.hidden = count > 0;
    };
    if (othersGroup) othersGroup.hidden = true;  // the script moves fields in and out
    if (selector) {
      selector.addEventListener("change", showChosen);
      showChosen();
    }
  }

  // --- models: versions, features and an example row -----------------------------------
  var hintsNode = document.getElementById("model-hints");
  var model = form.querySelector("[data-model]");
  var version = form.querySelector("[data-version]");
  var rows = form.querySelector("[data-rows]");
  var schema = document.getElementById("rows-schema");
  var example = document.getElementById("rows-example");
  if (!hintsNode || !model) return;
  var hints = JSON.parse(hintsNode.textContent);
  var schemaTail = schema ? " A JSON list of rows, each by feature name or a list in order." : "";

  function picked() {
    var found = hints[model.value.trim()];
    if (!found) return null;
    var ref = (version && version.value) || "latest";
    var number = ref === "latest" ? found.latest : (found.aliases[ref] || ref);
    var described = found.versions[String(number)];
    return described ? { number: number, version: described } : null;
  }

  function followModel() {
    if (!version) return;
    var name = model.value.trim();
    Array.prototype.forEach.call(version.querySelectorAll("optgroup"), function (group) {
      var mine = group.dataset.model === name;
      group.hidden = !mine;
      // Options too: some browsers still list the options of a hidden optgroup.
      Array.prototype.forEach.call(group.querySelectorAll("option"), function (option) {
        option.disabled = !mine;
        option.hidden = !mine;
      });
    });
    var selected = version.options[version.selectedIndex];
    if (selected && selected.disabled) version.value = "latest";
    var found = hints[name];
    version.options[0].textContent = found ? "latest (v" + found.latest + ")" : "latest";
  }

  function followVersion() {
    var found = picked();
    if (schema) {
      schema.textContent = found
        ? model.value.trim() + " v" + found.number + " takes " + found.version.features + "." + schemaTail
        : "Pick a model to see the features its rows need." + schemaTail;
    }
    if (rows) rows.placeholder = found ? found.version.example : "[{\"feature\": 0}]";
    if (example) example.hidden = !found;
  }

  if (example && rows) {
    example.addEventListener("click", function () {
      var found = picked();
      if (found) rows.value = JSON.stringify(JSON.parse(found.version.example), null, 2);
    });
  }
  model.addEventListener("input", function () { followModel(); followVersion(); });
  model.addEventListener("change", function () { followModel(); followVersion(); });
  if (version) version.addEventListener("change", followVersion);
  followModel();
  followVersion();
})();
