// A network of Cloister nodes, each in an AMD SEV-SNP confidential VM. Node 0 starts the service;
// the others join it over the peer port, which only the subnet can reach.
targetScope = 'resourceGroup'

@description('Number of nodes. Node 0 starts the service; every other node joins it.')
@minValue(1)
@maxValue(15)
param nodeCount int = 3

@description('Prefix of every resource name and of the nodes\' DNS labels.')
@minLength(1)
@maxLength(40)
param namePrefix string = 'cloister'

@description('Azure region; it must offer the confidential VM size.')
param location string = resourceGroup().location

@description('An AMD SEV-SNP confidential VM size (DCasv5 / ECasv5 family).')
param vmSize string = 'Standard_DC2as_v5'

@description('Confidential OS disk encryption: the disk and the VM guest state, or the guest state only.')
@allowed([
  'DiskWithVMGuestState'
  'VMGuestStateOnly'
])
param osDiskEncryption string = 'DiskWithVMGuestState'

@description('Administrator account of every VM.')
param adminUsername string = 'cloister'

@description('SSH public key of adminUsername. Required even with enableSsh false: password login is disabled, and Azure needs one credential.')
param sshPublicKey string

@description('Open SSH (22) to clientSourcePrefix and start sshd on the nodes.')
param enableSsh bool = false

@description('CIDR the clients connect from; it may reach the HTTPS and gRPC ports (and SSH when enableSsh).')
param clientSourcePrefix string

@description('Address space of the virtual network.')
param vnetPrefix string = '10.0.0.0/16'

@description('Address range of the nodes\' subnet; node i gets its host address 10 + i.')
param subnetPrefix string = '10.0.0.0/24'

@description('Client HTTPS (REST) port.')
param httpsPort int = 8000

@description('Client gRPC port.')
param grpcPort int = 8001

@description('Node-to-node port (Raft, forwarded writes, joins); reachable from the subnet only.')
param peerPort int = 8002

@description('HTTPS URL of the Cloister node binary.')
param binaryUrl string

@description('SHA-256 of the node binary, hex; a node refuses a binary that does not match.')
@minLength(64)
@maxLength(64)
param binarySha256 string

@description('PEM certificate of the operator CA (public).')
param serviceCaCertificate string

@description('PEM certificates of the genesis members (public).')
@minLength(1)
param memberCertificates array

@description('Application the network starts with.')
@allowed([
  'reconcile'
  'banking'
  'none'
])
param app string = 'reconcile'

@description('Attestation evidence the nodes produce.')
@allowed([
  'azure-vtpm'
])
param attestation string = 'azure-vtpm'

// Azure reserves the first host addresses of a subnet; cidrHost index 9 is the tenth address (.10).
var firstHostIndex = 9
var dnsSuffix = uniqueString(resourceGroup().id)

module network 'modules/network.bicep' = {
  name: '${namePrefix}-network'
  params: {
    namePrefix: namePrefix
    location: location
    vnetPrefix: vnetPrefix
    subnetPrefix: subnetPrefix
    clientSourcePrefix: clientSourcePrefix
    httpsPort: httpsPort
    grpcPort: grpcPort
    peerPort: peerPort
    enableSsh: enableSsh
  }
}

// The nodes deploy in parallel: a joiner keeps retrying (raft.join_timeout_ms) until node 0 answers.
module nodeDeployments 'modules/node.bicep' = [for i in range(0, nodeCount): {
  name: '${namePrefix}-node${i}'
  params: {
    name: '${namePrefix}-node${i}'
    index: i
    location: location
    vmSize: vmSize
    osDiskEncryption: osDiskEncryption
    adminUsername: adminUsername
    sshPublicKey: sshPublicKey
    subnetId: network.outputs.subnetId
    privateIp: cidrHost(subnetPrefix, firstHostIndex + i)
    joinAddress: i == 0 ? '' : cidrHost(subnetPrefix, firstHostIndex)
    dnsLabel: toLower('${namePrefix}-node${i}-${dnsSuffix}')
    httpsPort: httpsPort
    grpcPort: grpcPort
    peerPort: peerPort
    binaryUrl: binaryUrl
    binarySha256: binarySha256
    serviceCaCertificate: serviceCaCertificate
    memberCertificates: memberCertificates
    app: app
    attestation: attestation
    enableSsh: enableSsh
  }
}]

output nodes array = [for i in range(0, nodeCount): {
  name: nodeDeployments[i].outputs.name
  privateIp: nodeDeployments[i].outputs.privateIp
  publicHost: nodeDeployments[i].outputs.publicHost
  restUrl: 'https://${nodeDeployments[i].outputs.publicHost}:${httpsPort}'
  grpcUrl: 'https://${nodeDeployments[i].outputs.publicHost}:${grpcPort}'
  peerUrl: 'https://${nodeDeployments[i].outputs.privateIp}:${peerPort}'
}]

// Nodes serve certificates from the service identity, not the operator's CA, so the identity is
// fetched over the operator's authenticated channel to the VM rather than over TLS it would anchor.
output fetchServiceCertificate string = 'az vm run-command invoke --resource-group ${resourceGroup().name} --name ${nodeDeployments[0].outputs.name} --command-id RunShellScript --scripts "cat /var/lib/cloister/data/service_identity.pem" --query "value[0].message" --output tsv | sed -n "/BEGIN CERTIFICATE/,/END CERTIFICATE/p" > service_identity.pem'

output resourceGroupName string = resourceGroup().name
