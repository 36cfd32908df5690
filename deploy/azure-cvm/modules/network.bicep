// The nodes' virtual network: one subnet, guarded by one NSG.

@description('Prefix of the network resource names.')
param namePrefix string

@description('Azure region of the network.')
param location string

@description('Address space of the virtual network.')
param vnetPrefix string

@description('Address range of the nodes\' subnet; the only source allowed on the peer port.')
param subnetPrefix string

@description('CIDR that may reach the HTTPS and gRPC ports (and SSH when enableSsh).')
param clientSourcePrefix string

@description('Client HTTPS (REST) port.')
param httpsPort int

@description('Client gRPC port.')
param grpcPort int

@description('Node-to-node port: Raft, forwarded writes and joins.')
param peerPort int

@description('Whether SSH (22) is open to clientSourcePrefix.')
param enableSsh bool

var clientRules = [
  {
    name: 'allow-clients'
    properties: {
      priority: 100
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: clientSourcePrefix
      sourcePortRange: '*'
      destinationAddressPrefix: subnetPrefix
      destinationPortRanges: [
        string(httpsPort)
        string(grpcPort)
      ]
    }
  }
  {
    // Peers authenticate each other with mutual TLS, but the port has no business outside the subnet.
    name: 'allow-peers'
    properties: {
      priority: 110
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: subnetPrefix
      sourcePortRange: '*'
      destinationAddressPrefix: subnetPrefix
      destinationPortRange: string(peerPort)
    }
  }
]

var sshRules = enableSsh ? [
  {
    name: 'allow-ssh'
    properties: {
      priority: 120
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: clientSourcePrefix
      sourcePortRange: '*'
      destinationAddressPrefix: subnetPrefix
      destinationPortRange: '22'
    }
  }
] : []

// Overrides the default AllowVnetInBound rule (65000), which would open every port to the whole VNet.
var denyRules = [
  {
    name: 'deny-all-inbound'
    properties: {
      priority: 4096
      direction: 'Inbound'
      access: 'Deny'
      protocol: '*'
      sourceAddressPrefix: '*'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '*'
    }
  }
]

resource nsg 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: '${namePrefix}-nsg'
  location: location
  properties: {
    securityRules: concat(clientRules, sshRules, denyRules)
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: '${namePrefix}-vnet'
  location: location
  properties: {
    addressSpace: {
      addressPrefixes: [
        vnetPrefix
      ]
    }
    subnets: [
      {
        name: 'nodes'
        properties: {
          addressPrefix: subnetPrefix
          networkSecurityGroup: {
            id: nsg.id
          }
        }
      }
    ]
  }
}

output subnetId string = vnet.properties.subnets[0].id
