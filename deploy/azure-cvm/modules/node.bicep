// One Cloister node: an AMD SEV-SNP confidential VM with its NIC and public IP.

@description('VM name; also its host name.')
param name string

@description('Position of the node in the network; node 0 starts the service.')
param index int

@description('Azure region of the node.')
param location string

@description('An AMD SEV-SNP confidential VM size (DCasv5 / ECasv5 family).')
param vmSize string

@description('What the confidential OS disk encryption covers.')
@allowed([
  'DiskWithVMGuestState'
  'VMGuestStateOnly'
])
param osDiskEncryption string

@description('Administrator account of the VM.')
param adminUsername string

@description('SSH public key of adminUsername.')
param sshPublicKey string

@description('Resource ID of the nodes\' subnet.')
param subnetId string

@description('Static private IP of the node, inside the subnet.')
param privateIp string

@description('Private IP of the node to join; empty for node 0.')
param joinAddress string

@description('DNS label of the public IP.')
param dnsLabel string

@description('Client HTTPS (REST) port.')
param httpsPort int

@description('Client gRPC port.')
param grpcPort int

@description('Node-to-node port.')
param peerPort int

@description('URL of the node binary.')
param binaryUrl string

@description('SHA-256 of the node binary, hex.')
param binarySha256 string

@description('PEM certificate of the operator CA.')
param serviceCaCertificate string

@description('PEM certificates of the genesis members.')
param memberCertificates array

@description('Application the network starts with.')
param app string

@description('Attestation evidence the node produces.')
param attestation string

@description('Whether SSH is reachable; cloud-init keeps sshd off otherwise.')
param enableSsh bool

// Every value known before deployment; the public host name is only known once the IP exists.
var cloudInitTemplate = loadTextContent('../cloud-init.yaml')
var withNode = replace(replace(replace(replace(cloudInitTemplate, '__CLOISTER_NODE_NAME__', name), '__CLOISTER_NODE_INDEX__', string(index)), '__CLOISTER_PRIVATE_IP__', privateIp), '__CLOISTER_JOIN_ADDRESS__', joinAddress)
var withPorts = replace(replace(replace(withNode, '__CLOISTER_HTTPS_PORT__', string(httpsPort)), '__CLOISTER_GRPC_PORT__', string(grpcPort)), '__CLOISTER_PEER_PORT__', string(peerPort))
var withRelease = replace(replace(replace(replace(withPorts, '__CLOISTER_BINARY_URL__', binaryUrl), '__CLOISTER_BINARY_SHA256__', binarySha256), '__CLOISTER_ATTESTATION__', attestation), '__CLOISTER_APP__', app)
// The PEM documents go in base64 so that their line breaks cannot break the YAML around them.
var withTrust = replace(replace(replace(withRelease, '__CLOISTER_SSH__', enableSsh ? 'on' : 'off'), '__CLOISTER_SERVICE_CA_B64__', base64(serviceCaCertificate)), '__CLOISTER_MEMBERS_B64__', base64(join(memberCertificates, '\n')))

resource publicIp 'Microsoft.Network/publicIPAddresses@2024-05-01' = {
  name: '${name}-ip'
  location: location
  sku: {
    name: 'Standard'
    tier: 'Regional'
  }
  properties: {
    publicIPAllocationMethod: 'Static'
    publicIPAddressVersion: 'IPv4'
    dnsSettings: {
      domainNameLabel: dnsLabel
    }
  }
}

resource nic 'Microsoft.Network/networkInterfaces@2024-05-01' = {
  name: '${name}-nic'
  location: location
  properties: {
    ipConfigurations: [
      {
        name: 'ipconfig1'
        properties: {
          privateIPAllocationMethod: 'Static'
          privateIPAddress: privateIp
          subnet: {
            id: subnetId
          }
          publicIPAddress: {
            id: publicIp.id
          }
        }
      }
    ]
  }
}

resource vm 'Microsoft.Compute/virtualMachines@2024-07-01' = {
  name: name
  location: location
  properties: {
    hardwareProfile: {
      vmSize: vmSize
    }
    securityProfile: {
      securityType: 'ConfidentialVM'
      uefiSettings: {
        secureBootEnabled: true
        vTpmEnabled: true
      }
    }
    storageProfile: {
      imageReference: {
        publisher: 'Canonical'
        offer: '0001-com-ubuntu-confidential-vm-jammy'
        sku: '22_04-lts-cvm'
        version: 'latest'
      }
      osDisk: {
        name: '${name}-osdisk'
        createOption: 'FromImage'
        deleteOption: 'Delete'
        managedDisk: {
          storageAccountType: 'Premium_LRS'
          securityProfile: {
            securityEncryptionType: osDiskEncryption
          }
        }
      }
    }
    osProfile: {
      computerName: name
      adminUsername: adminUsername
      customData: base64(replace(withTrust, '__CLOISTER_PUBLIC_HOST__', publicIp.properties.dnsSettings.fqdn))
      linuxConfiguration: {
        disablePasswordAuthentication: true
        ssh: {
          publicKeys: [
            {
              path: '/home/${adminUsername}/.ssh/authorized_keys'
              keyData: sshPublicKey
            }
          ]
        }
      }
    }
    networkProfile: {
      networkInterfaces: [
        {
          id: nic.id
          properties: {
            deleteOption: 'Delete'
          }
        }
      ]
    }
    diagnosticsProfile: {
      bootDiagnostics: {
        enabled: true
      }
    }
  }
}

output name string = vm.name
output privateIp string = privateIp
output publicHost string = publicIp.properties.dnsSettings.fqdn
