// Evaluates IAM requests with @cloud-copilot/iam-simulate, a simulator fleet-access did not write.
// A test tool, run in its own process by tests/src/iam_evaluator.rs: never linked into the product.
//
// stdin:  a JSON array of cases:
//         {id, principal, action, resource, accountId, context: {key: value | [values]},
//          identityPolicies: [{name, policy}], validate?: false}
//         validate: false is for AWS-owned documents only: their ARNs have no account
//         (arn:aws:ssm:us-east-1::document/AWS-StartSSHSession), which the simulator's resource
//         validation does not accept; the evaluation itself is the same.
// stdout: a JSON array, one result per case, in order:
//         {id, decision: "Allowed" | "ExplicitlyDenied" | "ImplicitlyDenied",
//          ignoredContextKeys: [..]}  or  {id, error: "..."} when the simulator refused the input
//          (an invalid policy, action, ARN or context key).
'use strict'

const { runSimulation, runUnsafeSimulation } = require('@cloud-copilot/iam-simulate')

async function evaluate(c) {
  const simulation = {
    request: {
      principal: c.principal,
      action: c.action,
      resource: { resource: c.resource, accountId: c.accountId },
      contextVariables: c.context || {}
    },
    identityPolicies: c.identityPolicies,
    serviceControlPolicies: [],
    resourceControlPolicies: []
  }
  if (c.validate === false) {
    const decision = runUnsafeSimulation(simulation, { simulationMode: 'Strict' })
    return { id: c.id, decision, ignoredContextKeys: [] }
  }
  const response = await runSimulation(simulation, { simulationMode: 'Strict' })
  if (response.resultType === 'error') {
    return { id: c.id, error: JSON.stringify(response.errors) }
  }
  if (response.resultType !== 'single') {
    return { id: c.id, error: `expected one resource, got ${response.resultType}` }
  }
  return {
    id: c.id,
    decision: response.overallResult,
    ignoredContextKeys: response.result.ignoredContextKeys || []
  }
}

async function main() {
  let input = ''
  for await (const chunk of process.stdin) input += chunk
  const cases = JSON.parse(input)
  const results = []
  for (const c of cases) {
    try {
      results.push(await evaluate(c))
    } catch (e) {
      results.push({ id: c.id, error: String((e && e.stack) || e) })
    }
  }
  process.stdout.write(JSON.stringify(results))
}

main().catch((e) => {
  process.stderr.write(String((e && e.stack) || e) + '\n')
  process.exit(1)
})
